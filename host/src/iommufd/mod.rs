//! The iommufd uAPI (`/dev/iommu`), beside the VFIO type1 container, on the same host
//! VT-d driver: what `drivers/iommu/iommufd/` does for a VMM.
//!
//! - [`IommufdFile`]: one open `/dev/iommu`, a [`UapiFile`]; its ioctls go through one
//!   table (`Ctx::IOCTLS`, Linux's `iommufd_ioctl_ops`: number, argument sizes, handler)
//!   and act on the file's own objects, by id: IOAS, paging HWPT, nested HWPT (a guest
//!   stage-1 table over a nest parent, attached at a PASID), device.
//! - [`device::VfioDeviceFile`]: a VFIO device cdev (`/dev/vfio/devices/vfioN`) that binds
//!   its device to an iommufd and attaches it to a page table.
//! - [`iopt`]: an IOAS's IOVA space and its rules.
//!
//! Objects reference each other (a HWPT its IOAS, a device the HWPT it is attached to);
//! `IOMMU_DESTROY` of a referenced object is EBUSY, of an unknown id ENOENT. An id never
//! names an object of another file, so one VMM never reaches another's objects. Every
//! ioctl checks everything before its first change, and undoes its changes when the
//! hardware refuses one, so a failed ioctl changes nothing.

pub mod device;
mod error;
pub mod fault;
mod inval;
pub mod iopt;
pub mod smmu;
mod user;
pub mod vevent;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use vsva_uapi::iommu::{IOMMU_SVA_VTD_GPASID_EAFE, IOMMU_SVA_VTD_GPASID_SRE};
use vsva_uapi::iommufd::*;
use vsva_uapi::request::BindGpasid;
use vsva_uapi::wire::{read_prefix, Wire};
use vsva_uapi::{Errno, EventNotifier, UapiError, UapiFile};
use vsva_vtd::regs::layout::offset;
use vsva_vtd::{DomainId, Gpa, Iova, Pasid, SourceId};

use crate::container::IommuBackend;
use crate::driver::{DirtyBitmap, HostIommu, VtdDomain};
use device::Iommufds;
pub use error::IommufdError;
use fault::FaultFile;
use inval::Invalidation;
use iopt::{Area, Iopt, IOVA_ALIGNMENT};
use user::{copy_from_user, copy_to_user, for_each_user_entry, UserArray};

/// An IOAS: an IOVA space the VMM maps its memory into.
#[derive(Debug, Default)]
struct Ioas {
    iopt: Iopt,
}

/// A paging HWPT: a second-level domain holding its IOAS's mappings.
#[derive(Debug)]
struct HwptPaging {
    ioas: u32,
    domain: VtdDomain,
    nest_parent: bool,
    /// `IOMMU_HWPT_ALLOC_PASID`: may serve a device whose PASIDs are attached.
    pasid: bool,
    /// Created by attaching a device to the IOAS itself; destroyed with its last device.
    auto: bool,
}

/// A nested HWPT: a guest stage-1 table over a nest-parent HWPT, with a domain id of its
/// own (its IOTLB entries are tagged with it).
#[derive(Debug)]
struct HwptNested {
    parent: u32,
    did: DomainId,
    s1: IommuHwptVtdS1,
    /// `IOMMU_HWPT_ALLOC_PASID`.
    pasid: bool,
    /// The fault queue (object id and file) its page requests go to.
    fault: Option<(u32, Arc<FaultFile>)>,
    unit: Arc<HostIommu>,
}

impl Drop for HwptNested {
    fn drop(&mut self) {
        if self.fault.is_some() {
            self.unit.set_page_request_sink(self.did, None);
        }
        self.unit.free_domain_id(self.did);
    }
}

impl HwptNested {
    /// The type1 bind data the stage-1 table amounts to, for `pasid`.
    fn bind(&self, pasid: Pasid) -> BindGpasid {
        let mut vtd_flags = 0;
        if self.s1.flags & IOMMU_VTD_S1_SRE != 0 {
            vtd_flags |= IOMMU_SVA_VTD_GPASID_SRE;
        }
        if self.s1.flags & IOMMU_VTD_S1_EAFE != 0 {
            vtd_flags |= IOMMU_SVA_VTD_GPASID_EAFE;
        }
        BindGpasid {
            hpasid: pasid,
            gpasid: Some(pasid),
            gpgd: Gpa(self.s1.pgtbl_addr),
            addr_width: self.s1.addr_width,
            vtd_flags,
            pat: 0,
            emt: 0,
        }
    }
}

/// A device bound to the file (`struct iommufd_device`).
#[derive(Debug)]
struct Device {
    sid: SourceId,
    /// The HWPT its requests without PASID use.
    rid: Option<u32>,
    /// The nested HWPT of each attached PASID.
    pasids: BTreeMap<Pasid, u32>,
}

#[derive(Debug)]
enum Object {
    Ioas(Ioas),
    HwptPaging(HwptPaging),
    HwptNested(HwptNested),
    Device(Device),
    Fault(Arc<FaultFile>),
}

impl Object {
    fn kind(&self) -> &'static str {
        match self {
            Object::Ioas(_) => "IOAS",
            Object::HwptPaging(_) => "paging HWPT",
            Object::HwptNested(_) => "nested HWPT",
            Object::Device(_) => "device",
            Object::Fault(_) => "fault queue",
        }
    }
}

/// What a file holds, for diagnostics and tests: each object by id, its type and what it
/// references.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ObjectState {
    /// An IOAS and its areas (IOVA, length, host address).
    Ioas(Vec<(u64, u64, u64)>),
    /// A paging HWPT: its IOAS, and whether it is a nest parent.
    HwptPaging {
        /// The IOAS it maps.
        ioas: u32,
        /// `IOMMU_HWPT_ALLOC_NEST_PARENT`.
        nest_parent: bool,
    },
    /// A nested HWPT and its parent.
    HwptNested {
        /// The nest-parent HWPT.
        parent: u32,
        /// The guest's stage-1 table (a GPA).
        pgtbl_addr: u64,
    },
    /// A fault queue.
    Fault,
    /// A device and the HWPT of its RID.
    Device {
        /// Its requester id.
        sid: SourceId,
        /// The HWPT its RID is attached to.
        rid: Option<u32>,
        /// The HWPT of each attached PASID.
        pasids: Vec<(u32, u32)>,
    },
}

/// One open `/dev/iommu`: its objects.
#[derive(Debug)]
pub struct Ctx {
    unit: Arc<HostIommu>,
    objects: BTreeMap<u32, Object>,
    /// The fd table fault queue files are installed in.
    fds: Weak<Iommufds>,
}

/// The handler of one ioctl: the context, the ioctl's argument description, the bytes.
type Handler = fn(&mut Ctx, &Ucmd, &mut [u8]) -> Result<(), IommufdError>;

/// One row of the ioctl table (`struct iommufd_ioctl_op`).
struct IoctlOp {
    ucmd: Ucmd,
    handler: Handler,
}

fn check_reserved(value: u64, what: &'static str) -> Result<(), IommufdError> {
    if value != 0 {
        return Err(IommufdError::not_supported(
            what,
            "reserved field is not zero",
        ));
    }
    Ok(())
}

impl Ctx {
    /// The iommufd ioctls: the argument's size and minimum size, and the handler. Adding
    /// an ioctl is one row here.
    const IOCTLS: &'static [IoctlOp] = &[
        IoctlOp {
            ucmd: UCMD_DESTROY,
            handler: Ctx::do_destroy,
        },
        IoctlOp {
            ucmd: UCMD_IOAS_ALLOC,
            handler: Ctx::do_ioas_alloc,
        },
        IoctlOp {
            ucmd: UCMD_IOAS_ALLOW_IOVAS,
            handler: Ctx::do_ioas_allow_iovas,
        },
        IoctlOp {
            ucmd: UCMD_IOAS_COPY,
            handler: Ctx::do_ioas_copy,
        },
        IoctlOp {
            ucmd: UCMD_IOAS_IOVA_RANGES,
            handler: Ctx::do_ioas_iova_ranges,
        },
        IoctlOp {
            ucmd: UCMD_IOAS_MAP,
            handler: Ctx::do_ioas_map,
        },
        IoctlOp {
            ucmd: UCMD_IOAS_UNMAP,
            handler: Ctx::do_ioas_unmap,
        },
        IoctlOp {
            ucmd: UCMD_HWPT_ALLOC,
            handler: Ctx::do_hwpt_alloc,
        },
        IoctlOp {
            ucmd: UCMD_HWPT_INVALIDATE,
            handler: Ctx::do_hwpt_invalidate,
        },
        IoctlOp {
            ucmd: UCMD_GET_HW_INFO,
            handler: Ctx::do_get_hw_info,
        },
        IoctlOp {
            ucmd: UCMD_FAULT_QUEUE_ALLOC,
            handler: Ctx::do_fault_queue_alloc,
        },
        IoctlOp {
            ucmd: UCMD_HWPT_SET_DIRTY_TRACKING,
            handler: Ctx::do_hwpt_set_dirty_tracking,
        },
        IoctlOp {
            ucmd: UCMD_HWPT_GET_DIRTY_BITMAP,
            handler: Ctx::do_hwpt_get_dirty_bitmap,
        },
    ];

    fn new(unit: Arc<HostIommu>, fds: Weak<Iommufds>) -> Self {
        Ctx {
            unit,
            objects: BTreeMap::new(),
            fds,
        }
    }

    /// Performs one ioctl on its argument bytes.
    pub fn ioctl(&mut self, cmd: u32, arg: &mut [u8]) -> Result<(), IommufdError> {
        let op = Self::IOCTLS
            .iter()
            .find(|op| op.ucmd.cmd == cmd)
            .ok_or(IommufdError::UnknownIoctl(cmd))?;
        (op.handler)(self, &op.ucmd, arg)
    }

    /// The objects, by id.
    pub fn objects(&self) -> BTreeMap<u32, ObjectState> {
        self.objects
            .iter()
            .map(|(&id, o)| {
                let s = match o {
                    Object::Ioas(i) => ObjectState::Ioas(
                        i.iopt.areas().map(|a| (a.iova, a.length, a.hpa)).collect(),
                    ),
                    Object::HwptPaging(h) => ObjectState::HwptPaging {
                        ioas: h.ioas,
                        nest_parent: h.nest_parent,
                    },
                    Object::HwptNested(h) => ObjectState::HwptNested {
                        parent: h.parent,
                        pgtbl_addr: h.s1.pgtbl_addr,
                    },
                    Object::Fault(_) => ObjectState::Fault,
                    Object::Device(d) => ObjectState::Device {
                        sid: d.sid,
                        rid: d.rid,
                        pasids: d.pasids.iter().map(|(p, &h)| (p.raw(), h)).collect(),
                    },
                };
                (id, s)
            })
            .collect()
    }

    /// The lowest free id from 1 (`xa_alloc` with `XA_FLAGS_ALLOC1`).
    fn next_id(&self) -> Result<u32, IommufdError> {
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

    fn ioas(&self, id: u32) -> Result<&Ioas, IommufdError> {
        match self.objects.get(&id) {
            Some(Object::Ioas(i)) => Ok(i),
            _ => Err(IommufdError::NoObject { id, want: "IOAS" }),
        }
    }

    fn ioas_mut(&mut self, id: u32) -> Result<&mut Ioas, IommufdError> {
        match self.objects.get_mut(&id) {
            Some(Object::Ioas(i)) => Ok(i),
            _ => Err(IommufdError::NoObject { id, want: "IOAS" }),
        }
    }

    fn device(&self, id: u32) -> Result<&Device, IommufdError> {
        match self.objects.get(&id) {
            Some(Object::Device(d)) => Ok(d),
            _ => Err(IommufdError::NoObject { id, want: "device" }),
        }
    }

    fn paging_mut(&mut self, id: u32) -> Option<&mut HwptPaging> {
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
    fn users(&self, id: u32) -> usize {
        self.objects
            .values()
            .filter(|o| match o {
                Object::HwptPaging(h) => h.ioas == id,
                Object::HwptNested(h) => {
                    h.parent == id || h.fault.as_ref().is_some_and(|(f, _)| *f == id)
                }
                Object::Device(d) => d.rid == Some(id) || d.pasids.values().any(|&h| h == id),
                Object::Ioas(_) | Object::Fault(_) => false,
            })
            .count()
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
                    .map_pages(a.iova, a.hpa, a.length, a.read, a.write)
                {
                    result = Err(e.into());
                    break 'all;
                }
                done.push((h, *a));
            }
        }
        if result.is_err() {
            for (h, a) in done {
                if let Some(hwpt) = self.paging_mut(h) {
                    hwpt.domain.unmap_dma(Iova(a.iova), a.length);
                }
            }
        }
        result
    }

    /// Adds `areas` to IOAS `ioas` and its domains.
    fn add_areas(&mut self, ioas: u32, areas: &[Area]) -> Result<(), IommufdError> {
        self.map_into_domains(ioas, areas)?;
        let i = self.ioas_mut(ioas)?;
        for a in areas {
            i.iopt.insert(*a);
        }
        Ok(())
    }

    // ----- Handlers -----

    /// `IOMMU_DESTROY`: ENOENT for an unknown id, EBUSY for an object referenced by
    /// another (an IOAS with HWPTs, a HWPT with devices) or a device (its cdev owns it).
    fn do_destroy(&mut self, u: &Ucmd, arg: &mut [u8]) -> Result<(), IommufdError> {
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

    /// Removes an object no other references (its domain and reservations go with it).
    fn remove_object(&mut self, id: u32) {
        if let Some(Object::HwptPaging(h)) = self.objects.remove(&id) {
            if let Ok(ioas) = self.ioas_mut(h.ioas) {
                ioas.iopt.unreserve(id);
            }
        }
    }

    /// `IOMMU_IOAS_ALLOC`: flags must be 0 (EOPNOTSUPP).
    fn do_ioas_alloc(&mut self, u: &Ucmd, arg: &mut [u8]) -> Result<(), IommufdError> {
        let mut cmd: IommuIoasAlloc = u.copy_in(arg)?;
        if cmd.flags != 0 {
            return Err(IommufdError::not_supported("iommu_ioas_alloc", "flags"));
        }
        let id = self.next_id()?;
        self.objects.insert(id, Object::Ioas(Ioas::default()));
        cmd.out_ioas_id = id;
        u.respond(&cmd, arg);
        Ok(())
    }

    /// `IOMMU_IOAS_MAP`: the area [`iopt::map_area`] checks, mapped into every domain of
    /// the IOAS; the IOVA written back.
    fn do_ioas_map(&mut self, u: &Ucmd, arg: &mut [u8]) -> Result<(), IommufdError> {
        let mut cmd: IommuIoasMap = u.copy_in(arg)?;
        let iopt = &self.ioas(cmd.ioas_id)?.iopt;
        let area = iopt::map_area(iopt, self.unit.hardware().memory(), &cmd)?;
        self.add_areas(cmd.ioas_id, &[area])?;
        cmd.iova = area.iova;
        u.respond(&cmd, arg);
        Ok(())
    }

    /// `IOMMU_IOAS_COPY`: maps the memory behind `[src_iova, +length)` of one IOAS (which
    /// must be mapped without a hole, ENOENT) into another, with the given flags, at
    /// `dst_iova` or an allocated IOVA written back.
    fn do_ioas_copy(&mut self, u: &Ucmd, arg: &mut [u8]) -> Result<(), IommufdError> {
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
            .ioas(cmd.src_ioas_id)?
            .iopt
            .pages(cmd.src_iova, cmd.length)?;
        let dst = &self.ioas(cmd.dst_ioas_id)?.iopt;
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
    /// cut one), `0, U64_MAX` every area; `length` returns the bytes unmapped.
    fn do_ioas_unmap(&mut self, u: &Ucmd, arg: &mut [u8]) -> Result<(), IommufdError> {
        let mut cmd: IommuIoasUnmap = u.copy_in(arg)?;
        let all = cmd.iova == 0 && cmd.length == u64::MAX;
        if !all && (cmd.iova == u64::MAX || cmd.length == u64::MAX) {
            return Err(IommufdError::Overflow("iommu_ioas_unmap"));
        }
        let plan = self
            .ioas(cmd.ioas_id)?
            .iopt
            .unmap_plan(cmd.iova, cmd.length)?;
        let hwpts = self.hwpts_of(cmd.ioas_id);
        let mut unmapped = 0u64;
        for a in &plan {
            for &h in &hwpts {
                if let Some(hwpt) = self.paging_mut(h) {
                    hwpt.domain.unmap_dma(Iova(a.iova), a.length);
                }
            }
            self.ioas_mut(cmd.ioas_id)?.iopt.remove(a.iova);
            unmapped += a.length;
        }
        cmd.length = unmapped;
        u.respond(&cmd, arg);
        Ok(())
    }

    /// `IOMMU_IOAS_IOVA_RANGES`: the usable ranges into the user array, as many as
    /// `num_iovas` allows; `num_iovas` returns how many there are (EMSGSIZE, after the
    /// write back, when that is more than the array holds) and `out_iova_alignment` 4 KiB.
    fn do_ioas_iova_ranges(&mut self, u: &Ucmd, arg: &mut [u8]) -> Result<(), IommufdError> {
        let mut cmd: IommuIoasIovaRanges = u.copy_in(arg)?;
        check_reserved(cmd.__reserved.into(), "iommu_ioas_iova_ranges")?;
        let ranges = self.ioas(cmd.ioas_id)?.iopt.iova_ranges();
        let max = cmd.num_iovas as usize;
        let mut out = Vec::new();
        for &(start, last) in ranges.iter().take(max) {
            out.extend(IommuIovaRange { start, last }.to_bytes());
        }
        copy_to_user(self.unit.hardware().memory(), cmd.allowed_iovas, &out)?;
        cmd.num_iovas = ranges.len() as u32;
        cmd.out_iova_alignment = IOVA_ALIGNMENT;
        u.respond(&cmd, arg);
        if ranges.len() > max {
            return Err(IommufdError::MsgSize("iommu_ioas_iova_ranges"));
        }
        Ok(())
    }

    /// `IOMMU_IOAS_ALLOW_IOVAS`: replaces the ranges the IOVA allocator may use.
    fn do_ioas_allow_iovas(&mut self, u: &Ucmd, arg: &mut [u8]) -> Result<(), IommufdError> {
        let cmd: IommuIoasAllowIovas = u.copy_in(arg)?;
        check_reserved(cmd.__reserved.into(), "iommu_ioas_allow_iovas")?;
        self.ioas(cmd.ioas_id)?;
        let len = (cmd.num_iovas as usize) * std::mem::size_of::<IommuIovaRange>();
        let bytes = copy_from_user(self.unit.hardware().memory(), cmd.allowed_iovas, len)?;
        let ranges: Vec<(u64, u64)> = bytes
            .chunks_exact(std::mem::size_of::<IommuIovaRange>())
            .map(|c| {
                let r: IommuIovaRange = read_prefix(c, c.len());
                (r.start, r.last)
            })
            .collect();
        self.ioas_mut(cmd.ioas_id)?.iopt.set_allowed(&ranges)
    }

    /// `IOMMU_HWPT_ALLOC`. With an IOAS as `pt_id`, a paging HWPT: a new second-level
    /// domain holding the IOAS's mappings, its IOVAs beyond the domain's address width
    /// reserved in the IOAS (EADDRINUSE when mapped or allowed). Flags NEST_PARENT (needs
    /// ECAP.NEST), PASID and DIRTY_TRACKING (needs ECAP.SLADS); FAULT_ID_VALID and data are
    /// not supported (EOPNOTSUPP) on a paging HWPT.
    fn do_hwpt_alloc(&mut self, u: &Ucmd, arg: &mut [u8]) -> Result<(), IommufdError> {
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
            Some(Object::HwptPaging(_)) => self.alloc_nested(&cmd)?,
            Some(o) => {
                return Err(IommufdError::WrongType {
                    id: cmd.pt_id,
                    is: o.kind(),
                    what: WHAT,
                })
            }
        };
        cmd.out_hwpt_id = id;
        u.respond(&cmd, arg);
        Ok(())
    }

    /// A nested HWPT over paging HWPT `cmd.pt_id` (`iommufd_hwpt_nested_alloc` and
    /// `intel_iommu_domain_alloc_nested`): flags FAULT_ID_VALID and PASID only
    /// (EOPNOTSUPP), data of type VTD_S1 (EOPNOTSUPP for another), at least
    /// `iommu_hwpt_vtd_s1` up to `__reserved` (EINVAL), read from `data_uptr` (EFAULT)
    /// with the copy rules of a structure (E2BIG); a parent that is not a nest parent, or
    /// an automatic one, EINVAL; stage-1 flags SRE/EAFE/WPE only and `__reserved` zero
    /// (EOPNOTSUPP); the entry checks of the type1 bind (EINVAL/ENODEV). No fault queue
    /// exists yet, so FAULT_ID_VALID is ENOENT for every `fault_id`.
    fn alloc_nested(&mut self, cmd: &IommuHwptAlloc) -> Result<u32, IommufdError> {
        const WHAT: &str = "nested HWPT";
        if cmd.flags & !(IOMMU_HWPT_FAULT_ID_VALID | IOMMU_HWPT_ALLOC_PASID) != 0 {
            return Err(IommufdError::not_supported(
                WHAT,
                format!("flags {:#x}", cmd.flags),
            ));
        }
        if cmd.data_type != IOMMU_HWPT_DATA_VTD_S1 {
            return Err(if cmd.data_type == IOMMU_HWPT_DATA_NONE {
                IommufdError::invalid(WHAT, "no data")
            } else {
                IommufdError::not_supported(WHAT, format!("data type {}", cmd.data_type))
            });
        }
        let Some(Object::HwptPaging(parent)) = self.objects.get(&cmd.pt_id) else {
            return Err(IommufdError::NoObject {
                id: cmd.pt_id,
                want: "paging HWPT",
            });
        };
        if !parent.nest_parent || parent.auto {
            return Err(IommufdError::invalid(
                WHAT,
                "the parent is not a nest parent",
            ));
        }
        let known = std::mem::size_of::<IommuHwptVtdS1>();
        let len = cmd.data_len as usize;
        if len < known {
            return Err(IommufdError::invalid(
                WHAT,
                "data_len below iommu_hwpt_vtd_s1",
            ));
        }
        let bytes = copy_from_user(self.unit.hardware().memory(), cmd.data_uptr, len)?;
        if bytes[known..].iter().any(|&b| b != 0) {
            return Err(UapiError::TrailingBytes {
                what: WHAT,
                size: cmd.data_len,
                known,
            }
            .into());
        }
        let s1: IommuHwptVtdS1 = read_prefix(&bytes, known);
        if s1.flags & !(IOMMU_VTD_S1_SRE | IOMMU_VTD_S1_EAFE | IOMMU_VTD_S1_WPE) != 0
            || s1.__reserved != 0
        {
            return Err(IommufdError::not_supported(
                WHAT,
                "stage-1 flags or reserved",
            ));
        }
        let fault = if cmd.flags & IOMMU_HWPT_FAULT_ID_VALID != 0 {
            match self.objects.get(&cmd.fault_id) {
                Some(Object::Fault(f)) => Some((cmd.fault_id, f.clone())),
                _ => {
                    return Err(IommufdError::NoObject {
                        id: cmd.fault_id,
                        want: "fault queue",
                    })
                }
            }
        } else {
            None
        };
        let id = self.next_id()?;
        let did = self.unit.alloc_domain_id()?;
        let nested = HwptNested {
            parent: cmd.pt_id,
            did,
            s1,
            pasid: cmd.flags & IOMMU_HWPT_ALLOC_PASID != 0,
            fault,
            unit: self.unit.clone(),
        };
        let probe = Pasid::new(1).map_err(|e| IommufdError::invalid(WHAT, e.to_string()))?;
        let wpe = s1.flags & IOMMU_VTD_S1_WPE != 0;
        parent
            .domain
            .nested_pasid_entry(did, &nested.bind(probe), wpe)?;
        if let Some((_, f)) = &nested.fault {
            self.unit.set_page_request_sink(did, Some(f.sink()));
        }
        self.objects.insert(id, Object::HwptNested(nested));
        Ok(id)
    }

    /// `IOMMU_HWPT_INVALIDATE` of a nested HWPT (`intel_nested_cache_invalidate_user`):
    /// `entry_num` entries of `entry_len` bytes from `data_uptr` (EINVAL for entries
    /// without a pointer or a length), each an `iommu_hwpt_vtd_s1_invalidate` (type
    /// VTD_S1, at least its size: EINVAL; a longer entry's tail zero: E2BIG): flags LEAF
    /// only and `__reserved` zero (EOPNOTSUPP), `addr` 4 KiB aligned and `npages ==
    /// U64_MAX` only with `addr == 0`, which flushes everything (EINVAL). Each entry
    /// flushes the PASID-based IOTLB and device TLB of every PASID the HWPT is attached at;
    /// the first refused entry stops the array and `entry_num` returns how many were done.
    /// A HWPT that is not nested is EINVAL; `entry_num` 0 is a probe.
    fn do_hwpt_invalidate(&mut self, u: &Ucmd, arg: &mut [u8]) -> Result<(), IommufdError> {
        let mut cmd: IommuHwptInvalidate = u.copy_in(arg)?;
        let mut done = 0u32;
        let result = self.invalidate_array(&cmd, &mut done);
        // As the kernel, `entry_num` is written back on every outcome past the copy-in.
        cmd.entry_num = done;
        u.respond(&cmd, arg);
        result
    }

    fn invalidate_array(
        &self,
        cmd: &IommuHwptInvalidate,
        done: &mut u32,
    ) -> Result<(), IommufdError> {
        const WHAT: &str = "iommu_hwpt_invalidate";
        check_reserved(cmd.__reserved.into(), WHAT)?;
        if cmd.entry_num != 0 && (cmd.data_uptr == 0 || cmd.entry_len == 0) {
            return Err(IommufdError::invalid(
                WHAT,
                "entries without a pointer or length",
            ));
        }
        let nested = match self.objects.get(&cmd.hwpt_id) {
            None => {
                return Err(IommufdError::NoObject {
                    id: cmd.hwpt_id,
                    want: "HWPT",
                })
            }
            Some(Object::HwptNested(n)) => n,
            Some(o) => {
                return Err(IommufdError::WrongType {
                    id: cmd.hwpt_id,
                    is: o.kind(),
                    what: WHAT,
                })
            }
        };
        let targets: Vec<(SourceId, Pasid)> = self
            .objects
            .values()
            .filter_map(|o| match o {
                Object::Device(d) => Some(d),
                _ => None,
            })
            .flat_map(|d| {
                d.pasids
                    .iter()
                    .filter(|&(_, &h)| h == cmd.hwpt_id)
                    .map(|(&p, _)| (d.sid, p))
            })
            .collect();
        // The entries are read a chunk at a time and coalesced; their descriptors go to
        // the unit as one batch with one wait. An entry that is refused ends the array,
        // after the entries before it are carried out.
        let mut inv = Invalidation::default();
        let result = self.read_entries(cmd, |e| {
            inv.add(e.addr, e.npages, e.flags & IOMMU_VTD_INV_FLAGS_LEAF != 0);
            *done += 1;
        });
        let mut descs = Vec::new();
        inv.descriptors(
            nested.did,
            &targets,
            &self.unit.cap(),
            &self.unit.ecap(),
            &mut descs,
        );
        if !descs.is_empty() {
            if let Err(e) = self.unit.invalidate(&descs) {
                *done = 0;
                return Err(e.into());
            }
        }
        result
    }

    /// Reads and checks the array's `iommu_hwpt_vtd_s1_invalidate` entries in order,
    /// handing each accepted one to `accept`, until the first refused one: a data type
    /// other than VTD_S1 or an entry shorter than the structure (EINVAL), a longer one
    /// whose tail is not zero (E2BIG), flags other than LEAF or `__reserved` set
    /// (EOPNOTSUPP), an address not 4 KiB aligned or `npages == U64_MAX` with a non-zero
    /// address (EINVAL).
    fn read_entries(
        &self,
        cmd: &IommuHwptInvalidate,
        mut accept: impl FnMut(&IommuHwptVtdS1Invalidate),
    ) -> Result<(), IommufdError> {
        const WHAT: &str = "iommu_hwpt_vtd_s1_invalidate";
        if cmd.entry_num == 0 {
            return Ok(());
        }
        if cmd.data_type != IOMMU_HWPT_INVALIDATE_DATA_VTD_S1 {
            return Err(IommufdError::invalid(WHAT, "data type"));
        }
        let known = std::mem::size_of::<IommuHwptVtdS1Invalidate>();
        if (cmd.entry_len as usize) < known {
            return Err(IommufdError::invalid(WHAT, "entry_len below the entry"));
        }
        let array = UserArray {
            uptr: cmd.data_uptr,
            entry_len: cmd.entry_len,
            entry_num: cmd.entry_num,
        };
        for_each_user_entry(
            self.unit.hardware().memory(),
            array,
            known,
            WHAT,
            |_, bytes| {
                let e: IommuHwptVtdS1Invalidate = read_prefix(bytes, known);
                if e.flags & !IOMMU_VTD_INV_FLAGS_LEAF != 0 || e.__reserved != 0 {
                    return Err(IommufdError::not_supported(WHAT, "flags or reserved"));
                }
                if e.addr % IOVA_ALIGNMENT != 0 || (e.npages == u64::MAX && e.addr != 0) {
                    return Err(IommufdError::invalid(WHAT, "address not aligned"));
                }
                accept(&e);
                Ok(())
            },
        )
    }

    /// `IOMMU_GET_HW_INFO` of a bound device: `iommu_hw_info_vtd` with the unit's CAP and
    /// ECAP registers as read now, copied into the user buffer up to `data_len` (the rest
    /// of a larger buffer zeroed; `data_len` returns the kernel's length), type INTEL_VTD
    /// (an input type other than DEFAULT or INTEL_VTD, or unknown flags: EOPNOTSUPP), the
    /// PASID width and the capabilities (dirty tracking with ECAP.SLADS, PASID execute and
    /// privileged with ECAP.ERS and SRS).
    fn do_get_hw_info(&mut self, u: &Ucmd, arg: &mut [u8]) -> Result<(), IommufdError> {
        const WHAT: &str = "iommu_hw_info";
        let mut cmd: IommuHwInfo = u.copy_in(arg)?;
        if cmd.flags & !IOMMU_HW_INFO_FLAG_INPUT_TYPE != 0 || cmd.__reserved != [0; 3] {
            return Err(IommufdError::not_supported(WHAT, "flags or reserved"));
        }
        self.device(cmd.dev_id)?;
        let asked = hw_info_data_type(&cmd);
        if cmd.flags & IOMMU_HW_INFO_FLAG_INPUT_TYPE != 0
            && asked != IOMMU_HW_INFO_TYPE_DEFAULT
            && asked != IOMMU_HW_INFO_TYPE_INTEL_VTD
        {
            return Err(IommufdError::not_supported(
                WHAT,
                format!("data type {asked}"),
            ));
        }
        let hw = self.unit.hardware();
        let reg = |off| {
            hw.mmio_read(off, 8)
                .map_err(crate::driver::DriverError::from)
        };
        let data = IommuHwInfoVtd {
            flags: 0,
            __reserved: 0,
            cap_reg: reg(offset::CAP)?,
            ecap_reg: reg(offset::ECAP)?,
        };
        let image = data.to_bytes();
        let mut out = vec![0u8; cmd.data_len as usize];
        let n = out.len().min(image.len());
        out[..n].copy_from_slice(&image[..n]);
        copy_to_user(hw.memory(), cmd.data_uptr, &out)?;
        let ecap = self.unit.ecap();
        let mut caps = 0;
        if ecap.slads {
            caps |= IOMMU_HW_CAP_DIRTY_TRACKING;
        }
        if ecap.ers {
            caps |= IOMMU_HW_CAP_PCI_PASID_EXEC;
        }
        if ecap.srs {
            caps |= IOMMU_HW_CAP_PCI_PASID_PRIV;
        }
        cmd = hw_info(
            cmd.size,
            cmd.flags,
            cmd.dev_id,
            IOMMU_HW_INFO_TYPE_INTEL_VTD,
        );
        let original: IommuHwInfo = u.copy_in(arg)?;
        cmd.data_uptr = original.data_uptr;
        cmd.data_len = image.len() as u32;
        cmd.out_max_pasid_log2 = if ecap.pasid {
            ecap.pasid_bits() as u8
        } else {
            0
        };
        cmd.out_capabilities = caps;
        u.respond(&cmd, arg);
        Ok(())
    }

    /// `IOMMU_FAULT_QUEUE_ALLOC`: flags must be 0 (EOPNOTSUPP); a fault queue object and
    /// its file, installed in the process's fd table (`out_fault_id`, `out_fault_fd`).
    fn do_fault_queue_alloc(&mut self, u: &Ucmd, arg: &mut [u8]) -> Result<(), IommufdError> {
        let mut cmd: IommuFaultAlloc = u.copy_in(arg)?;
        if cmd.flags != 0 {
            return Err(IommufdError::not_supported("iommu_fault_alloc", "flags"));
        }
        let fds = self.fds.upgrade().ok_or(IommufdError::NoFd)?;
        let id = self.next_id()?;
        let file = FaultFile::new(&self.unit);
        let fd = fds.install_fault(file.clone());
        self.objects.insert(id, Object::Fault(file));
        cmd.out_fault_id = id;
        cmd.out_fault_fd = fd as u32;
        u.respond(&cmd, arg);
        Ok(())
    }

    fn alloc_paging(&mut self, ioas: u32, flags: u32, data_type: u32) -> Result<u32, IommufdError> {
        const WHAT: &str = "paging HWPT";
        let known =
            IOMMU_HWPT_ALLOC_NEST_PARENT | IOMMU_HWPT_ALLOC_PASID | IOMMU_HWPT_ALLOC_DIRTY_TRACKING;
        if flags & !known != 0 {
            return Err(IommufdError::not_supported(
                WHAT,
                format!("flags {flags:#x}"),
            ));
        }
        if data_type != IOMMU_HWPT_DATA_NONE {
            return Err(IommufdError::not_supported(WHAT, "driver data"));
        }
        let nest_parent = flags & IOMMU_HWPT_ALLOC_NEST_PARENT != 0;
        let ecap = self.unit.ecap();
        if nest_parent && !(ecap.nest && ecap.flts) {
            return Err(IommufdError::not_supported(WHAT, "no nested translation"));
        }
        let dirty = flags & IOMMU_HWPT_ALLOC_DIRTY_TRACKING != 0;
        let id = self.build_paging(ioas, false, dirty)?;
        if let Some(h) = self.paging_mut(id) {
            h.nest_parent = nest_parent;
            h.pasid = flags & IOMMU_HWPT_ALLOC_PASID != 0;
        }
        Ok(id)
    }

    /// A new paging HWPT of `ioas`: domain, reservation, the IOAS's mappings replayed.
    /// With `dirty`, a domain that can track dirty pages (`IOMMU_HWPT_ALLOC_DIRTY_TRACKING`:
    /// EOPNOTSUPP when the unit cannot).
    fn build_paging(&mut self, ioas: u32, auto: bool, dirty: bool) -> Result<u32, IommufdError> {
        let id = self.next_id()?;
        let mut domain = if dirty {
            VtdDomain::new_dirty_tracking(&self.unit)?
        } else {
            VtdDomain::new(&self.unit)?
        };
        let width = domain.addr_width();
        let iopt = &mut self.ioas_mut(ioas)?.iopt;
        if width < 64 {
            iopt.reserve(id, 1u64 << width, u64::MAX)?;
        }
        let areas: Vec<Area> = iopt.areas().copied().collect();
        let mut done = Vec::new();
        for a in &areas {
            if let Err(e) = domain.map_pages(a.iova, a.hpa, a.length, a.read, a.write) {
                for d in done {
                    let d: &Area = d;
                    domain.unmap_dma(Iova(d.iova), d.length);
                }
                if let Ok(i) = self.ioas_mut(ioas) {
                    i.iopt.unreserve(id);
                }
                return Err(e.into());
            }
            done.push(a);
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

    /// `IOMMU_HWPT_SET_DIRTY_TRACKING` (`iommufd_hwpt_set_dirty_tracking`): flags other
    /// than ENABLE are EOPNOTSUPP, an id that is not a paging HWPT ENOENT, a HWPT not
    /// allocated with `IOMMU_HWPT_ALLOC_DIRTY_TRACKING` EOPNOTSUPP; see
    /// [`VtdDomain::set_dirty_tracking`].
    fn do_hwpt_set_dirty_tracking(&mut self, u: &Ucmd, arg: &mut [u8]) -> Result<(), IommufdError> {
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
            .set_dirty_tracking(cmd.flags & IOMMU_HWPT_DIRTY_TRACKING_ENABLE != 0)?;
        Ok(())
    }

    /// `IOMMU_HWPT_GET_DIRTY_BITMAP` (`iommufd_hwpt_get_dirty_bitmap`): flags other than
    /// NO_CLEAR, or a non-zero `__reserved`, are EOPNOTSUPP; an id that is not a paging
    /// HWPT ENOENT; the range is checked as `iommufd_check_iova_range` checks it (EOVERFLOW,
    /// EINVAL) before the bitmap at `data` is touched (EFAULT unless it lies in the VMM's
    /// memory); then [`VtdDomain::read_and_clear_dirty`] sets the bits of the dirty pages
    /// in it, leaving the others as they were.
    fn do_hwpt_get_dirty_bitmap(&mut self, u: &Ucmd, arg: &mut [u8]) -> Result<(), IommufdError> {
        const WHAT: &str = "iommu_hwpt_get_dirty_bitmap";
        let cmd: IommuHwptGetDirtyBitmap = u.copy_in(arg)?;
        if cmd.flags & !IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR != 0 || cmd.__reserved != 0 {
            return Err(IommufdError::not_supported(
                WHAT,
                "unknown flags or reserved",
            ));
        }
        let mem = self.unit.hardware().memory().clone();
        let h = self.paging_mut(cmd.hwpt_id).ok_or(IommufdError::NoObject {
            id: cmd.hwpt_id,
            want: "paging HWPT",
        })?;
        let needed = DirtyBitmap::check_range(cmd.iova, cmd.length, cmd.page_size)?;
        let len = usize::try_from(needed).map_err(|_| IommufdError::Fault("bitmap"))?;
        let mut bytes = copy_from_user(&mem, cmd.data, len)?;
        let mut bitmap = DirtyBitmap::new(cmd.iova, cmd.length, cmd.page_size, &mut bytes)?;
        h.domain.read_and_clear_dirty(
            &mut bitmap,
            cmd.flags & IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR != 0,
        )?;
        copy_to_user(&mem, cmd.data, &bytes)
    }

    // ----- Devices (called by the device cdev) -----

    /// Binds device `sid` (`iommufd_device_bind`): a new device object, its id returned.
    /// EBUSY when the device is bound to this file already.
    pub(crate) fn bind_device(&mut self, sid: SourceId) -> Result<u32, IommufdError> {
        if self
            .objects
            .values()
            .any(|o| matches!(o, Object::Device(d) if d.sid == sid))
        {
            return Err(IommufdError::Busy("the device is bound already"));
        }
        let id = self.next_id()?;
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

    /// Unbinds a device: detached from everything, its object removed.
    pub(crate) fn unbind_device(&mut self, dev_id: u32) {
        let pasids: Vec<Pasid> = match self.objects.get(&dev_id) {
            Some(Object::Device(d)) => d.pasids.keys().copied().collect(),
            _ => Vec::new(),
        };
        for p in pasids {
            let _ = self.detach_pasid(dev_id, p.raw());
        }
        let _ = self.detach_rid(dev_id);
        self.objects.remove(&dev_id);
    }

    /// Attaches (or, when attached, replaces) `pasid` of device `dev_id` to nested HWPT
    /// `pt_id` (`iommufd_device_attach`/`replace` with a PASID): the HWPT must be nested
    /// with ALLOC_PASID (an IOAS, a paging HWPT or another object: EINVAL; a PASID above
    /// the unit's width or 0: EINVAL), and the device's RID attached to a paging HWPT
    /// with ALLOC_PASID or an automatic one (EINVAL otherwise). The nested PASID entry is
    /// written in one go, a replace rewriting the present entry; a refused attach or
    /// replace leaves the PASID as it was. Returns the HWPT id.
    pub(crate) fn attach_pasid(
        &mut self,
        dev_id: u32,
        pasid: u32,
        pt_id: u32,
    ) -> Result<u32, IommufdError> {
        const WHAT: &str = "PASID attach";
        let dev = self.device(dev_id)?;
        let (sid, rid, old) = (
            dev.sid,
            dev.rid,
            dev.pasids
                .iter()
                .find(|(p, _)| p.raw() == pasid)
                .map(|(_, &h)| h),
        );
        let ecap = self.unit.ecap();
        let p = Pasid::new(pasid)
            .ok()
            .filter(|p| p.raw() != 0 && ecap.pasid && u64::from(p.raw()) >> ecap.pasid_bits() == 0)
            .ok_or_else(|| IommufdError::invalid(WHAT, format!("PASID {pasid:#x}")))?;
        let nested = match self.objects.get(&pt_id) {
            None => {
                return Err(IommufdError::NoObject {
                    id: pt_id,
                    want: "page table",
                })
            }
            Some(Object::HwptNested(n)) if n.pasid => n,
            Some(o) => {
                return Err(IommufdError::invalid(
                    WHAT,
                    format!("a {} without ALLOC_PASID cannot serve a PASID", o.kind()),
                ))
            }
        };
        let rid_compat = rid.is_some_and(
            |r| matches!(self.objects.get(&r), Some(Object::HwptPaging(h)) if h.pasid || h.auto),
        );
        if !rid_compat {
            return Err(IommufdError::invalid(
                WHAT,
                "the RID is not on a PASID-compatible HWPT",
            ));
        }
        if old == Some(pt_id) {
            return Ok(pt_id);
        }
        let (parent_id, did) = (nested.parent, nested.did);
        let fault = nested.fault.as_ref().map(|(_, f)| f.clone());
        let wpe = nested.s1.flags & IOMMU_VTD_S1_WPE != 0;
        let bind = nested.bind(p);
        let Some(Object::HwptPaging(parent)) = self.objects.get(&parent_id) else {
            return Err(IommufdError::NoObject {
                id: parent_id,
                want: "paging HWPT",
            });
        };
        let entry = parent.domain.nested_pasid_entry(did, &bind, wpe)?;
        let old_nested = old.and_then(|o| match self.objects.get(&o) {
            Some(Object::HwptNested(n)) => {
                Some((n.parent, n.fault.as_ref().map(|(_, f)| f.clone())))
            }
            _ => None,
        });
        if let Some((_, Some(f))) = &old_nested {
            // The old HWPT's requests stop here; its unanswered groups get Invalid.
            self.unit.unroute_page_requests(sid, p);
            f.remove(sid, p);
        }
        let written = match old {
            Some(_) => self.unit.replace_pasid_entry(sid, p, &entry),
            None => self.unit.install_pasid_entry(sid, p, &entry),
        };
        if let Err(e) = written {
            if let Some((_, Some(f))) = &old_nested {
                if let Some(Object::HwptNested(n)) = old.and_then(|o| self.objects.get(&o)) {
                    self.unit.route_page_requests(sid, p, n.did);
                }
                f.add(sid, dev_id, p);
            }
            return Err(e.into());
        }
        if let Some(f) = &fault {
            f.add(sid, dev_id, p);
            self.unit.route_page_requests(sid, p, did);
        }
        if let Some((old_parent, _)) = old_nested {
            if let Some(h) = self.paging_mut(old_parent) {
                h.domain.track_nested(sid, p, None);
            }
        }
        if let Some(h) = self.paging_mut(parent_id) {
            h.domain.track_nested(sid, p, Some(did));
        }
        if let Some(Object::Device(d)) = self.objects.get_mut(&dev_id) {
            d.pasids.insert(p, pt_id);
        }
        Ok(pt_id)
    }

    /// Detaches `pasid` of device `dev_id`: the entry torn down, the PASID's page
    /// requests drained. A PASID not attached is left alone (as the kernel's detach).
    pub(crate) fn detach_pasid(&mut self, dev_id: u32, pasid: u32) -> Result<(), IommufdError> {
        let dev = self.device(dev_id)?;
        let sid = dev.sid;
        let Some((p, h)) = dev
            .pasids
            .iter()
            .find(|(p, _)| p.raw() == pasid)
            .map(|(&p, &h)| (p, h))
        else {
            return Ok(());
        };
        let fault = match self.objects.get(&h) {
            Some(Object::HwptNested(n)) => n.fault.as_ref().map(|(_, f)| f.clone()),
            _ => None,
        };
        if fault.is_some() {
            // Unrouted first: requests the teardown drains are answered Invalid by the unit.
            self.unit.unroute_page_requests(sid, p);
        }
        self.unit.remove_pasid_entry(sid, p, true);
        if let Some(f) = fault {
            f.remove(sid, p);
        }
        let parent = match self.objects.get(&h) {
            Some(Object::HwptNested(n)) => Some(n.parent),
            _ => None,
        };
        if let Some(hwpt) = parent.and_then(|id| self.paging_mut(id)) {
            hwpt.domain.track_nested(sid, p, None);
        }
        if let Some(Object::Device(d)) = self.objects.get_mut(&dev_id) {
            d.pasids.remove(&p);
        }
        Ok(())
    }

    /// Attaches (or replaces) device `dev_id`'s RID to `pt_id`: an IOAS (an automatic
    /// paging HWPT of it is found or made) or a paging HWPT; anything else EINVAL.
    /// Returns the HWPT id. A failed attach or replace leaves the device where it was.
    pub(crate) fn attach_rid(&mut self, dev_id: u32, pt_id: u32) -> Result<u32, IommufdError> {
        const WHAT: &str = "attach";
        let dev = self.device(dev_id)?;
        let (sid, old, has_pasids) = (dev.sid, dev.rid, !dev.pasids.is_empty());
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
            Some(Object::HwptPaging(h)) => {
                if has_pasids && !h.pasid {
                    return Err(IommufdError::invalid(
                        WHAT,
                        "PASIDs are attached: the RID needs a PASID-compatible HWPT",
                    ));
                }
                pt_id
            }
            Some(Object::HwptNested(_)) => {
                return Err(IommufdError::not_supported(
                    WHAT,
                    "a nested HWPT at the RID is not modelled",
                ))
            }
            Some(o) => {
                return Err(IommufdError::WrongType {
                    id: pt_id,
                    is: o.kind(),
                    what: WHAT,
                })
            }
        };
        if old == Some(hwpt) {
            return Ok(hwpt);
        }
        let result = self.move_rid(sid, old, hwpt);
        if let Err(e) = result {
            if let Some(id) = made {
                self.remove_object(id);
            }
            return Err(e);
        }
        if let Some(Object::Device(d)) = self.objects.get_mut(&dev_id) {
            d.rid = Some(hwpt);
        }
        if let Some(o) = old {
            self.drop_auto(o);
        }
        Ok(hwpt)
    }

    /// Points `sid`'s RID at HWPT `to`, from HWPT `from` when it has one.
    fn move_rid(&mut self, sid: SourceId, from: Option<u32>, to: u32) -> Result<(), IommufdError> {
        let Some(Object::HwptPaging(mut new)) = self.objects.remove(&to) else {
            return Err(IommufdError::NoObject {
                id: to,
                want: "paging HWPT",
            });
        };
        let result = match from.and_then(|f| self.paging_mut(f)) {
            Some(old) => new
                .domain
                .replace_device(sid, &mut old.domain)
                .map_err(Into::into),
            None => new.domain.attach(sid).map_err(Into::into),
        };
        self.objects.insert(to, Object::HwptPaging(new));
        result
    }

    /// Destroys an automatic HWPT no device uses any more.
    fn drop_auto(&mut self, id: u32) {
        let auto = matches!(self.objects.get(&id), Some(Object::HwptPaging(h)) if h.auto);
        if auto && self.users(id) == 0 {
            self.remove_object(id);
        }
    }

    /// Detaches device `dev_id`'s RID (ENOENT for an unknown device; a device not
    /// attached is left alone).
    pub(crate) fn detach_rid(&mut self, dev_id: u32) -> Result<(), IommufdError> {
        let dev = self.device(dev_id)?;
        let (sid, rid) = (dev.sid, dev.rid);
        let Some(h) = rid else {
            return Ok(());
        };
        if !dev.pasids.is_empty() {
            return Err(IommufdError::Busy("PASIDs of the device are attached"));
        }
        if let Some(hwpt) = self.paging_mut(h) {
            hwpt.domain.detach_device(sid);
        }
        if let Some(Object::Device(d)) = self.objects.get_mut(&dev_id) {
            d.rid = None;
        }
        self.drop_auto(h);
        Ok(())
    }
}

impl Drop for Ctx {
    /// Closing the file destroys every object: devices detach, then HWPTs and IOASes go.
    fn drop(&mut self) {
        let devices: Vec<u32> = self
            .objects
            .iter()
            .filter_map(|(&id, o)| matches!(o, Object::Device(_)).then_some(id))
            .collect();
        for d in devices {
            self.unbind_device(d);
        }
    }
}

/// One open `/dev/iommu`.
#[derive(Debug)]
pub struct IommufdFile {
    ctx: Mutex<Ctx>,
}

impl IommufdFile {
    /// Opens `/dev/iommu` on the host's VT-d unit, outside any fd table (it cannot hand
    /// out fault queue fds: `IOMMU_FAULT_QUEUE_ALLOC` is EMFILE).
    pub fn open(unit: &Arc<HostIommu>) -> Arc<Self> {
        Self::open_in(unit, Weak::new())
    }

    /// Opens `/dev/iommu` on the host's VT-d unit in the fd table `fds`.
    pub(crate) fn open_in(unit: &Arc<HostIommu>, fds: Weak<Iommufds>) -> Arc<Self> {
        Arc::new(IommufdFile {
            ctx: Mutex::new(Ctx::new(unit.clone(), fds)),
        })
    }

    /// The context, for the host side (device cdevs, diagnostics, tests).
    pub fn lock(&self) -> MutexGuard<'_, Ctx> {
        self.ctx.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn errno(what: &str, e: IommufdError) -> Errno {
    tracing::debug!("{what}: {e}");
    Errno::from(&e)
}

impl UapiFile for IommufdFile {
    fn ioctl(&self, cmd: u32, arg: &mut [u8]) -> Result<usize, Errno> {
        self.lock()
            .ioctl(cmd, arg)
            .map(|()| 0)
            .map_err(|e| errno("iommufd ioctl", e))
    }

    /// `/dev/iommu` has no `read`.
    fn read(&self, _buf: &mut [u8]) -> Result<usize, Errno> {
        Err(Errno::EINVAL)
    }

    /// `/dev/iommu` has no `write`.
    fn write(&self, _buf: &[u8]) -> Result<usize, Errno> {
        Err(Errno::EINVAL)
    }

    /// Nothing is ever queued on `/dev/iommu` itself (fault queues are files of their
    /// own).
    fn set_event_notifier(&self, _notifier: Option<Arc<dyn EventNotifier>>) {}
}
