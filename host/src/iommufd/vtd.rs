//! The iommufd configuration of the host's VT-d unit (`intel/iommu.c`'s
//! `intel_iommu_ops`, `intel/nested.c`): paging HWPTs are second-level domains, a nested
//! HWPT is a guest stage-1 table (`IOMMU_HWPT_DATA_VTD_S1`) over a nest parent with a
//! domain id of its own, attached at a PASID through the device cdev; invalidation is an
//! array of `iommu_hwpt_vtd_s1_invalidate`; page requests go to fault queues; dirty
//! tracking uses the second-level A/D bits (SLADE).

use std::convert::Infallible;
use std::sync::{Arc, Weak};

use vsva_hw::memory::{FrameAllocator, HostMemory};
use vsva_uapi::error::Errno;
use vsva_uapi::iommu::{IOMMU_SVA_VTD_GPASID_EAFE, IOMMU_SVA_VTD_GPASID_SRE};
use vsva_uapi::iommufd::*;
use vsva_uapi::request::{BindGpasid, PageRequest, PageResponse};
use vsva_uapi::wire::{read_prefix, Wire};
use vsva_vtd::regs::layout::offset;
use vsva_vtd::{addr::DomainId, addr::Gpa, addr::Iova, addr::Pasid, addr::SourceId};

use super::ctx::{self, Device, File, HwInfo, IoctlOp, IommuOps, IommufdCtx, PagingDomain};
use super::device::{Iommufds, OpenDevices};
use super::fault::{FaultFile, PageResponder};
use super::inval::Invalidation;
use super::iopt::IOVA_ALIGNMENT;
use super::user::{for_each_user_entry, UserArray};
use super::IommufdError;
use crate::container::IommuBackend;
use crate::driver::{DirtyBitmap, HostIommu, VtdDomain};

type Object = ctx::Object<Vtd>;

/// The VT-d configuration of the iommufd core: the host's unit.
#[derive(Debug)]
pub struct Vtd {
    unit: Arc<HostIommu>,
}

/// One open `/dev/iommu` on the host's VT-d unit: its objects.
pub type Ctx = IommufdCtx<Vtd>;

/// One open `/dev/iommu` on the host's VT-d unit.
pub type IommufdFile = File<Vtd>;

impl File<Vtd> {
    /// Opens `/dev/iommu` on the host's VT-d unit, outside any fd table (it cannot hand
    /// out fault queue fds: `IOMMU_FAULT_QUEUE_ALLOC` is EMFILE).
    pub fn open(unit: &Arc<HostIommu>) -> Arc<Self> {
        Self::open_in(unit, Weak::new())
    }

    /// Opens `/dev/iommu` on the host's VT-d unit in the fd table `fds`.
    pub(crate) fn open_in(unit: &Arc<HostIommu>, fds: Weak<Iommufds>) -> Arc<Self> {
        File::new(Vtd { unit: unit.clone() }, fds)
    }
}

/// A nested HWPT: a guest stage-1 table over a nest-parent HWPT, with a domain id of its
/// own (its IOTLB entries are tagged with it).
#[derive(Debug)]
pub struct HwptNested {
    parent: u32,
    did: DomainId,
    s1: IommuHwptVtdS1,
    /// `IOMMU_HWPT_ALLOC_PASID`.
    pasid: bool,
    /// The fault queue (object id and file) its page requests go to.
    fault: Option<(u32, Arc<FaultFile>)>,
    unit: Arc<HostIommu>,
    /// The (device, PASID) pairs it is attached at, in attach order: whom each
    /// invalidation reaches, kept as the attach and detach change them.
    attached: Vec<(SourceId, Pasid)>,
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

/// A page group response descriptor (`intel_iommu_page_response`).
impl PageResponder for HostIommu {
    fn page_response(
        &self,
        sid: SourceId,
        request: &PageRequest,
        response: &PageResponse,
    ) -> Result<(), Errno> {
        HostIommu::page_response(self, sid, request, response).map_err(|e| Errno::new(e.errno()))
    }
}

impl PagingDomain for VtdDomain {
    fn map_area(
        &mut self,
        iova: u64,
        hpa: u64,
        length: u64,
        read: bool,
        write: bool,
    ) -> Result<(), IommufdError> {
        VtdDomain::map_pages(self, iova, hpa, length, read, write).map_err(Into::into)
    }

    fn unmap_area(&mut self, iova: u64, length: u64) {
        IommuBackend::unmap_dma(self, Iova(iova), length);
    }

    fn iova_bits(&self) -> u32 {
        VtdDomain::addr_width(self)
    }

    /// See [`VtdDomain::set_dirty_tracking`].
    fn set_dirty(&mut self, enable: bool) -> Result<(), IommufdError> {
        VtdDomain::set_dirty_tracking(self, enable).map_err(Into::into)
    }

    /// See [`VtdDomain::read_and_clear_dirty`].
    fn read_dirty(&mut self, bitmap: &mut DirtyBitmap, no_clear: bool) -> Result<(), IommufdError> {
        VtdDomain::read_and_clear_dirty(self, bitmap, no_clear)
            .map(|_| ())
            .map_err(Into::into)
    }
}

impl IommuOps for Vtd {
    type Domain = VtdDomain;
    type Nested = HwptNested;
    type Object = Infallible;
    type State = ObjectState;

    const IOCTLS: &'static [IoctlOp<Self>] = &[
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
            ucmd: UCMD_IOAS_MAP_FILE,
            handler: Ctx::do_ioas_map_file,
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
    const PAGING_FLAGS: u32 =
        IOMMU_HWPT_ALLOC_NEST_PARENT | IOMMU_HWPT_ALLOC_PASID | IOMMU_HWPT_ALLOC_DIRTY_TRACKING;
    /// `intel_iommu_domain_alloc_paging_flags` takes both: the second level tracks.
    const DIRTY_NEST_PARENT: bool = true;
    const HW_INFO_TYPE: u32 = IOMMU_HW_INFO_TYPE_INTEL_VTD;
    const NAME: &'static str = "iommufd";

    fn memory(&self) -> &Arc<HostMemory> {
        self.unit.hardware().memory()
    }

    fn frames(&self) -> &Arc<FrameAllocator> {
        self.unit.frames()
    }

    fn open_devices(&self) -> &OpenDevices {
        self.unit.open_devices()
    }

    /// With `dirty`, a domain that can track dirty pages (EOPNOTSUPP without ECAP.SLADS).
    fn new_domain(&self, dirty: bool) -> Result<VtdDomain, IommufdError> {
        Ok(if dirty {
            VtdDomain::new_dirty_tracking(&self.unit)?
        } else {
            VtdDomain::new(&self.unit)?
        })
    }

    /// Nesting needs ECAP.NEST and first-level translation (ECAP.FLTS).
    fn check_nest_parent(&self) -> Result<(), IommufdError> {
        let ecap = self.unit.ecap();
        if !(ecap.nest && ecap.flts) {
            return Err(IommufdError::not_supported(
                "paging HWPT",
                "no nested translation",
            ));
        }
        Ok(())
    }

    /// `iommu_hw_info_vtd` with the unit's CAP and ECAP registers as read now, the PASID
    /// width and the capabilities (dirty tracking with ECAP.SLADS, PASID execute and
    /// privileged with ECAP.ERS and SRS).
    fn hw_info(&self) -> Result<HwInfo, IommufdError> {
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
        let ecap = self.unit.ecap();
        let mut capabilities = 0;
        if ecap.slads {
            capabilities |= IOMMU_HW_CAP_DIRTY_TRACKING;
        }
        if ecap.ers {
            capabilities |= IOMMU_HW_CAP_PCI_PASID_EXEC;
        }
        if ecap.srs {
            capabilities |= IOMMU_HW_CAP_PCI_PASID_PRIV;
        }
        Ok(HwInfo {
            data: data.to_bytes().to_vec(),
            max_pasid_log2: if ecap.pasid {
                ecap.pasid_bits() as u8
            } else {
                0
            },
            capabilities,
        })
    }

    fn responder(&self) -> Arc<dyn PageResponder> {
        self.unit.clone()
    }

    fn kind(o: &Infallible) -> &'static str {
        match *o {}
    }

    fn nested_refers(n: &HwptNested, id: u32) -> bool {
        n.parent == id || n.fault.as_ref().is_some_and(|(f, _)| *f == id)
    }

    fn object_refers(o: &Infallible, _id: u32) -> bool {
        match *o {}
    }

    fn state(o: &Object) -> ObjectState {
        match o {
            Object::Ioas(i) => {
                ObjectState::Ioas(i.areas().map(|a| (a.iova, a.length, a.hpa)).collect())
            }
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
            Object::Vendor(v) => match *v {},
        }
    }

    /// A nested HWPT over a paging HWPT; anything else EINVAL.
    fn alloc_hwpt_on(ctx: &mut Ctx, cmd: &IommuHwptAlloc) -> Result<u32, IommufdError> {
        match ctx.objects.get(&cmd.pt_id) {
            Some(Object::HwptPaging(_)) => ctx.alloc_nested(cmd),
            Some(o) => Err(IommufdError::WrongType {
                id: cmd.pt_id,
                is: o.kind(),
                what: "iommu_hwpt_alloc",
            }),
            None => Err(IommufdError::NoObject {
                id: cmd.pt_id,
                want: "page table",
            }),
        }
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
    fn invalidate(
        ctx: &Ctx,
        cmd: &IommuHwptInvalidate,
        done: &mut u32,
    ) -> Result<(), IommufdError> {
        ctx.invalidate_array(cmd, done)
    }

    /// A paging HWPT (a nested one at the RID is not modelled: EOPNOTSUPP); with PASIDs
    /// of the device attached, one allocated with ALLOC_PASID (EINVAL otherwise).
    fn rid_target(ctx: &Ctx, dev: &Device, pt_id: u32) -> Result<u32, IommufdError> {
        const WHAT: &str = "attach";
        match ctx.objects.get(&pt_id) {
            None => Err(IommufdError::NoObject {
                id: pt_id,
                want: "page table",
            }),
            Some(Object::HwptPaging(h)) => {
                if !dev.pasids.is_empty() && !h.pasid {
                    return Err(IommufdError::invalid(
                        WHAT,
                        "PASIDs are attached: the RID needs a PASID-compatible HWPT",
                    ));
                }
                Ok(pt_id)
            }
            Some(Object::HwptNested(_)) => Err(IommufdError::not_supported(
                WHAT,
                "a nested HWPT at the RID is not modelled",
            )),
            Some(o) => Err(IommufdError::WrongType {
                id: pt_id,
                is: o.kind(),
                what: WHAT,
            }),
        }
    }

    fn set_rid(
        ctx: &mut Ctx,
        dev_id: u32,
        old: Option<u32>,
        hwpt: u32,
    ) -> Result<(), IommufdError> {
        if old == Some(hwpt) {
            return Ok(());
        }
        let sid = ctx.device(dev_id)?.sid;
        ctx.move_rid(sid, old, hwpt)
    }

    fn release_rid(ctx: &mut Ctx, sid: SourceId, hwpt: u32) {
        if let Some(h) = ctx.paging_mut(hwpt) {
            h.domain.detach_device(sid);
        }
    }

    fn attach_pasid(
        ctx: &mut Ctx,
        dev_id: u32,
        pasid: u32,
        pt_id: u32,
    ) -> Result<u32, IommufdError> {
        ctx.attach_pasid(dev_id, pasid, pt_id)
    }

    fn detach_pasid(ctx: &mut Ctx, dev_id: u32, pasid: u32) -> Result<(), IommufdError> {
        ctx.detach_pasid(dev_id, pasid)
    }
}

impl IommufdCtx<Vtd> {
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
        let s1: IommuHwptVtdS1 = self.hwpt_data(cmd, WHAT)?;
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
        let did = self.ops.unit.alloc_domain_id()?;
        let nested = HwptNested {
            parent: cmd.pt_id,
            did,
            s1,
            pasid: cmd.flags & IOMMU_HWPT_ALLOC_PASID != 0,
            fault,
            unit: self.ops.unit.clone(),
            attached: Vec::new(),
        };
        let probe = Pasid::new(1).map_err(|e| IommufdError::invalid(WHAT, e.to_string()))?;
        let wpe = s1.flags & IOMMU_VTD_S1_WPE != 0;
        parent
            .domain
            .nested_pasid_entry(did, &nested.bind(probe), wpe)?;
        if let Some((_, f)) = &nested.fault {
            self.ops.unit.set_page_request_sink(did, Some(f.sink()));
        }
        self.objects.insert(id, Object::HwptNested(nested));
        Ok(id)
    }

    fn invalidate_array(
        &self,
        cmd: &IommuHwptInvalidate,
        done: &mut u32,
    ) -> Result<(), IommufdError> {
        const WHAT: &str = "iommu_hwpt_invalidate";
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
        // The entries are read a chunk at a time and coalesced; their descriptors go to
        // the unit as one batch with one wait. An entry that is refused ends the array,
        // after the entries before it are carried out.
        let mut inv = Invalidation::with_capacity(cmd.entry_num);
        let result = self.read_entries(cmd, |e| {
            inv.add(e.addr, e.npages, e.flags & IOMMU_VTD_INV_FLAGS_LEAF != 0);
            *done += 1;
        });
        let mut descs = Vec::new();
        inv.descriptors(
            nested.did,
            &nested.attached,
            &self.ops.unit.cap(),
            &self.ops.unit.ecap(),
            &mut descs,
        );
        if !descs.is_empty() {
            if let Err(e) = self.ops.unit.invalidate(&descs) {
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
            self.ops.unit.hardware().memory(),
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
        let ecap = self.ops.unit.ecap();
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
            self.ops.unit.unroute_page_requests(sid, p);
            f.remove(sid, p);
        }
        let written = match old {
            Some(_) => self.ops.unit.replace_pasid_entry(sid, p, &entry),
            None => self.ops.unit.install_pasid_entry(sid, p, &entry),
        };
        if let Err(e) = written {
            if let Some((_, Some(f))) = &old_nested {
                if let Some(Object::HwptNested(n)) = old.and_then(|o| self.objects.get(&o)) {
                    self.ops.unit.route_page_requests(sid, p, n.did);
                }
                f.add(sid, dev_id, p);
            }
            return Err(e.into());
        }
        if let Some(f) = &fault {
            f.add(sid, dev_id, p);
            self.ops.unit.route_page_requests(sid, p, did);
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
        if let Some(n) = old.and_then(|o| self.nested_mut(o)) {
            n.attached.retain(|&t| t != (sid, p));
        }
        if let Some(n) = self.nested_mut(pt_id) {
            n.attached.push((sid, p));
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
            self.ops.unit.unroute_page_requests(sid, p);
        }
        self.ops.unit.remove_pasid_entry(sid, p, true);
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
        if let Some(n) = self.nested_mut(h) {
            n.attached.retain(|&t| t != (sid, p));
        }
        Ok(())
    }

    /// The nested HWPT `id`, to change.
    fn nested_mut(&mut self, id: u32) -> Option<&mut HwptNested> {
        match self.objects.get_mut(&id) {
            Some(Object::HwptNested(n)) => Some(n),
            _ => None,
        }
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
}
