//! The vIOMMU's host calls over iommufd (`/dev/iommu`, Linux 6.2 onwards), as QEMU's
//! `intel_iommu` drives a passthrough device through an iommufd backend: the same vIOMMU,
//! another [`HostSva`].
//!
//! The VM's side of the uAPI ([`Iommufd`]): one IOAS holding guest RAM (GPA = IOVA), a
//! fault queue file, and per passthrough device ([`IommufdDevice`]) its VFIO cdev bound to
//! the iommufd and its RID attached to a nest-parent paging HWPT of the IOAS (stage 2,
//! GPA → HPA) that allows PASID attach. What the vIOMMU asks becomes:
//! - bind of a guest first-level PASID entry: `IOMMU_HWPT_ALLOC` of a nested HWPT over
//!   the parent with `IOMMU_HWPT_DATA_VTD_S1` (FLPTPTR as `pgtbl_addr`, FLPM as
//!   `addr_width`, SRE/EAFE/WPE as flags) and the fault queue, then
//!   `VFIO_DEVICE_ATTACH_IOMMUFD_PT` at the PASID; a changed entry is a new HWPT attached
//!   over the old one (the kernel's atomic replace) and the old one destroyed;
//! - unbind: `VFIO_DEVICE_DETACH_IOMMUFD_PT` of the PASID and `IOMMU_DESTROY` of its HWPT;
//! - the invalidations of one queue pass: one `IOMMU_HWPT_INVALIDATE` per nested HWPT
//!   carrying an array of `iommu_hwpt_vtd_s1_invalidate` (a refused entry ends the array,
//!   `entry_num` says how many were done; the entries after it are sent again). Device-TLB
//!   invalidations need no call: the host invalidates the device TLB with each entry;
//! - page requests: 40-byte `iommu_hwpt_pgfault` records read from the fault queue file,
//!   and the guest's page group response written back as `iommu_hwpt_page_response`
//!   with the group's cookie.
//!
//! With iommufd the guest owns its PASID numbers (there is no host PASID allocation):
//! [`GuestPasids`] is the VM's own PASID space the virtual command interface allocates
//! from. Structures passed by pointer (`data_uptr`) are written into a buffer of the
//! VMM's own memory ([`UserBuffer`]) the host reads them from.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::mem::size_of;
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vsva_uapi::iommu::{
    IOMMU_CACHE_INV_TYPE_DEV_IOTLB, IOMMU_CACHE_INV_TYPE_IOTLB, IOMMU_SVA_VTD_GPASID_EAFE,
    IOMMU_SVA_VTD_GPASID_SRE,
};
use vsva_uapi::iommufd::*;
use vsva_uapi::wire::{read_prefix, Wire};
use vsva_uapi::{
    error::Errno, file::HwptData, file::IommufdIoctls, file::UapiFile, file::UserArray,
    request::BindGpasid, request::CacheInvalidate, request::InvGranularity, request::PageRequest,
    request::PageResponse, request::PageResponseCode,
};
use vsva_vtd::{addr::Pasid, addr::SourceId};

use crate::config::PASID_BITS;
use crate::host::{HostSva, PasidSource};
use crate::viommu::lock;

/// Bytes of a page as `iommu_hwpt_vtd_s1_invalidate` counts them.
const PAGE: u64 = 4096;
/// Size of one fault queue record.
const RECORD: usize = size_of::<IommuHwptPgfault>();

/// A buffer of the VMM's own memory (a window of host memory mapped in the VMM, as
/// guest RAM is), which the host reads structures passed by pointer from.
pub struct UserBuffer {
    mem: Arc<GuestMemoryMmap>,
    va: u64,
    len: usize,
}

impl fmt::Debug for UserBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserBuffer")
            .field("va", &format_args!("{:#x}", self.va))
            .field("len", &self.len)
            .finish()
    }
}

impl UserBuffer {
    /// The VMM memory `mem` (one region) as a buffer: EINVAL for none or several regions.
    pub fn new(mem: Arc<GuestMemoryMmap>) -> Result<Self, Errno> {
        if mem.num_regions() != 1 {
            return Err(Errno::EINVAL);
        }
        let va = mem
            .get_host_address(GuestAddress(0))
            .map_err(|_| Errno::EINVAL)? as u64;
        let len = usize::try_from(mem.last_addr().0 + 1).map_err(|_| Errno::EINVAL)?;
        Ok(UserBuffer { mem, va, len })
    }

    /// Writes `bytes` at the buffer's start; their user address. EMSGSIZE if they do not
    /// fit.
    pub(crate) fn put(&self, bytes: &[u8]) -> Result<u64, Errno> {
        if bytes.len() > self.len {
            return Err(Errno::EMSGSIZE);
        }
        self.mem
            .write_slice(bytes, GuestAddress(0))
            .map_err(|_| Errno::EFAULT)?;
        Ok(self.va)
    }

    /// Its size in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

/// The VM's own PASID space (iommufd leaves PASID numbers to the guest): PASIDs 1 to
/// 2^20 - 1, at most `quota` held at a time.
#[derive(Debug)]
pub struct GuestPasids {
    held: Mutex<BTreeSet<u32>>,
    quota: usize,
}

impl GuestPasids {
    /// An empty space of which at most `quota` PASIDs are held at a time.
    pub fn new(quota: usize) -> Arc<Self> {
        Arc::new(GuestPasids {
            held: Mutex::default(),
            quota,
        })
    }

    /// The PASIDs held.
    pub fn held(&self) -> Vec<u32> {
        lock(&self.held).iter().copied().collect()
    }
}

impl PasidSource for GuestPasids {
    /// The lowest free PASID in `[min, max]` (PASID 0 is never handed out): EINVAL for an
    /// empty or out-of-width range, ENOSPC when the quota is reached or the range is full.
    fn pasid_alloc(&self, min: u32, max: u32) -> Result<Pasid, Errno> {
        let min = min.max(1);
        if min > max || max >> PASID_BITS != 0 {
            return Err(Errno::EINVAL);
        }
        let mut held = lock(&self.held);
        if held.len() >= self.quota {
            return Err(Errno::ENOSPC);
        }
        let mut next = min;
        for &used in held.range(min..=max) {
            if used != next {
                break;
            }
            next = used.checked_add(1).ok_or(Errno::ENOSPC)?;
        }
        if next > max {
            return Err(Errno::ENOSPC);
        }
        let pasid = Pasid::new(next).map_err(|_| Errno::EINVAL)?;
        held.insert(next);
        Ok(pasid)
    }

    /// EINVAL for a PASID not held.
    fn pasid_free(&self, pasid: Pasid) -> Result<(), Errno> {
        if lock(&self.held).remove(&pasid.raw()) {
            Ok(())
        } else {
            Err(Errno::EINVAL)
        }
    }
}

/// A page request group read and not yet answered: whose, and the cookie its response
/// must echo.
#[derive(Clone, Copy, Debug)]
struct Unanswered {
    sid: SourceId,
    pasid: Option<Pasid>,
    grpid: u32,
    cookie: u32,
}

#[derive(Debug, Default)]
struct FaultState {
    /// The host requester id of each bound device, by iommufd device id.
    devices: BTreeMap<u32, SourceId>,
    unanswered: Vec<Unanswered>,
}

/// The VM's fault queue (`IOMMU_FAULT_QUEUE_ALLOC`), for the virtual VT-d and the virtual
/// SMMUv3 alike: page request groups read from its file with the devices they came from,
/// each group's cookie kept until the guest's response goes back with it.
pub(crate) struct FaultQueue {
    id: u32,
    fd: i32,
    file: Arc<dyn UapiFile>,
    state: Mutex<FaultState>,
}

impl fmt::Debug for FaultQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultQueue")
            .field("id", &self.id)
            .field("fd", &self.fd)
            .finish_non_exhaustive()
    }
}

impl FaultQueue {
    /// `IOMMU_FAULT_QUEUE_ALLOC` on `iommufd`, whose fd number `open_fd` resolves to its
    /// file (EBADF if it does not; the object is then destroyed).
    pub(crate) fn alloc(
        iommufd: &dyn UapiFile,
        open_fd: &dyn Fn(i32) -> Option<Arc<dyn UapiFile>>,
    ) -> Result<Self, Errno> {
        let (id, fd) = iommufd.fault_queue_alloc(0)?;
        let Some(file) = open_fd(fd) else {
            let _ = iommufd.destroy(id);
            return Err(Errno::EBADF);
        };
        Ok(FaultQueue {
            id,
            fd,
            file,
            state: Mutex::default(),
        })
    }

    /// The object id.
    pub(crate) fn id(&self) -> u32 {
        self.id
    }

    /// The fd number.
    pub(crate) fn fd(&self) -> i32 {
        self.fd
    }

    /// Records of device `dev_id` come from the host device `sid`.
    pub(crate) fn add_device(&self, dev_id: u32, sid: SourceId) {
        lock(&self.state).devices.insert(dev_id, sid);
    }

    /// Device `dev_id` is gone.
    pub(crate) fn remove_device(&self, dev_id: u32) {
        lock(&self.state).devices.remove(&dev_id);
    }

    /// Reads every whole page request group queued on the fault queue file: each request
    /// with its device's host requester id, the group's cookie kept for the response.
    /// Records of devices not added here, or with a PASID beyond 20 bits, are EIO.
    pub(crate) fn read_page_requests(&self) -> Result<Vec<(SourceId, PageRequest)>, Errno> {
        let mut out = Vec::new();
        let mut buf = [0u8; RECORD * 16];
        loop {
            let n = match self.file.read(&mut buf) {
                Ok(n) => n,
                Err(Errno::EAGAIN) => return Ok(out),
                Err(e) => return Err(e),
            };
            let mut faults = lock(&self.state);
            for rec in buf[..n].chunks_exact(RECORD) {
                let r: IommuHwptPgfault = read_prefix(rec, RECORD);
                let sid = *faults.devices.get(&r.dev_id).ok_or(Errno::EIO)?;
                let pasid = if r.flags & IOMMU_PGFAULT_FLAGS_PASID_VALID != 0 {
                    Some(Pasid::new(r.pasid).map_err(|_| Errno::EIO)?)
                } else {
                    None
                };
                let last_page = r.flags & IOMMU_PGFAULT_FLAGS_LAST_PAGE != 0;
                if last_page {
                    faults.unanswered.push(Unanswered {
                        sid,
                        pasid,
                        grpid: r.grpid,
                        cookie: r.cookie,
                    });
                }
                out.push((
                    sid,
                    PageRequest {
                        pasid,
                        grpid: r.grpid,
                        read: r.perm & IOMMU_PGFAULT_PERM_READ != 0,
                        write: r.perm & IOMMU_PGFAULT_PERM_WRITE != 0,
                        exec: r.perm & IOMMU_PGFAULT_PERM_EXEC != 0,
                        privileged: r.perm & IOMMU_PGFAULT_PERM_PRIV != 0,
                        addr: r.addr & !(PAGE - 1),
                        last_page,
                        needs_pasid: pasid.is_some(),
                        private_data: None,
                    },
                ));
            }
            if n < buf.len() {
                return Ok(out);
            }
        }
    }

    /// Answers the unanswered group of `sid` that `resp` names (its group index, and its
    /// PASID when the response carries one) by writing its cookie and the code to the fault
    /// queue file. iommufd's codes are SUCCESS and INVALID: Response Failure goes down as
    /// INVALID (the device stops asking for the group either way). EINVAL when no such
    /// group is unanswered (as the kernel answers an unknown cookie).
    pub(crate) fn respond(&self, sid: SourceId, resp: &PageResponse) -> Result<(), Errno> {
        let mut faults = lock(&self.state);
        let at = faults
            .unanswered
            .iter()
            .position(|u| {
                u.sid == sid
                    && u.grpid == resp.grpid
                    && resp.pasid.is_none_or(|p| u.pasid == Some(p))
            })
            .ok_or(Errno::EINVAL)?;
        let group = faults.unanswered.remove(at);
        drop(faults);
        let code = match resp.code {
            PageResponseCode::Success => IOMMUFD_PAGE_RESP_SUCCESS,
            PageResponseCode::Invalid | PageResponseCode::Failure => IOMMUFD_PAGE_RESP_INVALID,
        };
        let bytes = IommuHwptPageResponse {
            cookie: group.cookie,
            code,
        }
        .to_bytes();
        self.file.write(&bytes).map(|_| ())
    }
}

/// One VM's `/dev/iommu`: its IOAS of guest RAM, its fault queue and the buffer its
/// pointer arguments go through.
pub struct Iommufd {
    file: Arc<dyn UapiFile>,
    /// The fd number of `file` in the VMM's fd table (what `VFIO_DEVICE_BIND_IOMMUFD`
    /// names); -1 for a VMM that never binds through it ([`Iommufd::attach_bound`]).
    fd: i32,
    ioas: u32,
    fault: FaultQueue,
    pasids: Arc<GuestPasids>,
    /// Serialises the use of the buffer (a structure written, then the ioctl reading it).
    scratch: Mutex<UserBuffer>,
}

impl fmt::Debug for Iommufd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Iommufd")
            .field("fd", &self.fd)
            .field("ioas", &self.ioas)
            .field("fault_id", &self.fault.id())
            .finish_non_exhaustive()
    }
}

impl Iommufd {
    /// Sets up the VM's objects on the open iommufd `file` (fd number `fd`): an IOAS
    /// (`IOMMU_IOAS_ALLOC`) and a fault queue (`IOMMU_FAULT_QUEUE_ALLOC`, whose fd number
    /// `open_fd` resolves to its file: EBADF if it does not). On failure what was made is
    /// destroyed.
    pub fn open(
        file: Arc<dyn UapiFile>,
        fd: i32,
        open_fd: &dyn Fn(i32) -> Option<Arc<dyn UapiFile>>,
        scratch: UserBuffer,
        pasids: Arc<GuestPasids>,
    ) -> Result<Arc<Self>, Errno> {
        let ioas = file.ioas_alloc()?;
        let fault = match FaultQueue::alloc(&*file, open_fd) {
            Ok(q) => q,
            Err(e) => {
                let _ = file.destroy(ioas);
                return Err(e);
            }
        };
        Ok(Arc::new(Iommufd {
            file,
            fd,
            ioas,
            fault,
            pasids,
            scratch: Mutex::new(scratch),
        }))
    }

    /// `/dev/iommu` itself.
    pub fn file(&self) -> Arc<dyn UapiFile> {
        self.file.clone()
    }

    /// The IOAS id.
    pub fn ioas(&self) -> u32 {
        self.ioas
    }

    /// The fault queue's object id.
    pub fn fault_id(&self) -> u32 {
        self.fault.id()
    }

    /// The fault queue's fd number.
    pub fn fault_fd(&self) -> i32 {
        self.fault.fd()
    }

    /// The VM's PASID space.
    pub fn pasids(&self) -> Arc<GuestPasids> {
        self.pasids.clone()
    }

    /// `IOMMU_IOAS_MAP` of the VMM's memory at `user_va` at IOVA `iova`, readable and
    /// writeable (guest RAM at its GPA).
    pub fn map(&self, user_va: u64, length: u64, iova: u64) -> Result<(), Errno> {
        self.file
            .ioas_map(self.ioas, IOMMU_IOAS_MAP_FLAGS, user_va, length, iova)
            .map(drop)
    }

    /// Binds the device of VFIO cdev `cdev` (host requester id `sid`) to the iommufd
    /// (`VFIO_DEVICE_BIND_IOMMUFD`), then attaches it as [`Iommufd::attach_bound`] does.
    /// On failure closing the cdev unbinds the device.
    pub fn attach_device(
        self: &Arc<Self>,
        cdev: Arc<dyn UapiFile>,
        sid: SourceId,
    ) -> Result<Arc<IommufdDevice>, Errno> {
        let dev_id = cdev.device_bind_iommufd(self.fd)?;
        self.attach_bound(cdev, dev_id, sid)
    }

    /// The device of VFIO cdev `cdev` (host requester id `sid`), already bound to the
    /// iommufd as `dev_id` (a VMM whose host bound it, as `vsva host` does on
    /// `DEVICE_ADD`): allocates its nest-parent HWPT on the IOAS (`IOMMU_HWPT_ALLOC` with
    /// NEST_PARENT and PASID) and attaches its RID there. On failure the HWPT is
    /// destroyed.
    pub fn attach_bound(
        self: &Arc<Self>,
        cdev: Arc<dyn UapiFile>,
        dev_id: u32,
        sid: SourceId,
    ) -> Result<Arc<IommufdDevice>, Errno> {
        let parent = self.file.hwpt_alloc(
            dev_id,
            self.ioas,
            IOMMU_HWPT_ALLOC_NEST_PARENT | IOMMU_HWPT_ALLOC_PASID,
            HwptData::NONE,
            0,
        )?;
        if let Err(e) = cdev.device_attach_pt(parent, None) {
            let _ = self.file.destroy(parent);
            return Err(e);
        }
        self.fault.add_device(dev_id, sid);
        Ok(Arc::new(IommufdDevice {
            fd: self.clone(),
            cdev,
            dev_id,
            sid,
            parent,
            hwpts: Mutex::default(),
        }))
    }

    /// Reads every whole page request group queued on the fault queue file, as
    /// `FaultQueue::read_page_requests` does.
    pub fn read_page_requests(&self) -> Result<Vec<(SourceId, PageRequest)>, Errno> {
        self.fault.read_page_requests()
    }

    /// `IOMMU_HWPT_ALLOC` of a nested HWPT over `parent` for `dev_id` with stage-1 data
    /// `s1`, page requests to the fault queue.
    fn alloc_nested(&self, dev_id: u32, parent: u32, s1: &IommuHwptVtdS1) -> Result<u32, Errno> {
        let scratch = lock(&self.scratch);
        let data_uptr = scratch.put(&s1.to_bytes())?;
        self.file.hwpt_alloc(
            dev_id,
            parent,
            IOMMU_HWPT_ALLOC_PASID | IOMMU_HWPT_FAULT_ID_VALID,
            HwptData::vtd_s1(data_uptr),
            self.fault.id(),
        )
    }

    /// `IOMMU_HWPT_INVALIDATE` of nested HWPT `hwpt` with `entries` as one array (as many
    /// arrays as the buffer needs): `Ok(())`, or the index of the entry the host refused
    /// and its errno (those before it were done, those after it were not).
    fn invalidate(
        &self,
        hwpt: u32,
        entries: &[IommuHwptVtdS1Invalidate],
    ) -> Result<(), (usize, Errno)> {
        invalidate_arrays(
            &*self.file,
            &lock(&self.scratch),
            hwpt,
            entries,
            |chunk| chunk.iter().flat_map(|e| e.to_bytes()).collect(),
            UserArray::vtd_s1,
        )
    }
}

/// `IOMMU_HWPT_INVALIDATE` of `entries` on `id` (a nested HWPT or a vIOMMU): each run of
/// entries that fits `scratch` encoded by `encode` there and passed as the array `array`
/// describes, one call per run. `Ok(())`, or the index of the entry the host refused and
/// its errno (those before it were done, those after it were not).
pub(crate) fn invalidate_arrays<E>(
    file: &dyn UapiFile,
    scratch: &UserBuffer,
    id: u32,
    entries: &[E],
    encode: impl Fn(&[E]) -> Vec<u8>,
    array: fn(u64, u32) -> UserArray,
) -> Result<(), (usize, Errno)> {
    let entry_len = array(0, 0).entry_len as usize;
    let per_call = (scratch.len() / entry_len).max(1);
    for (c, chunk) in entries.chunks(per_call).enumerate() {
        let base = c * per_call;
        let data_uptr = scratch.put(&encode(chunk)).map_err(|e| (base, e))?;
        if let (Err(e), entry_num) = file.hwpt_invalidate(id, array(data_uptr, chunk.len() as u32))
        {
            let done = (entry_num as usize).min(chunk.len().saturating_sub(1));
            return Err((base + done, e));
        }
    }
    Ok(())
}

/// The `iommu_hwpt_vtd_s1_invalidate` entry of an IOTLB invalidation and the PASID whose
/// nested HWPT it goes to; `None` for a device-TLB invalidation, which needs no call (the
/// host invalidates the device TLB with every entry). EINVAL for what no entry expresses:
/// no PASID, domain granularity, granules not a whole number of pages.
fn entry_of(inv: &CacheInvalidate) -> Result<Option<(Pasid, IommuHwptVtdS1Invalidate)>, Errno> {
    match (inv.cache, inv.granularity) {
        (IOMMU_CACHE_INV_TYPE_DEV_IOTLB, _) => Ok(None),
        (
            IOMMU_CACHE_INV_TYPE_IOTLB,
            InvGranularity::Pasid {
                pasid: Some(pasid), ..
            },
        ) => Ok(Some((
            pasid,
            IommuHwptVtdS1Invalidate {
                addr: 0,
                npages: u64::MAX,
                flags: 0,
                __reserved: 0,
            },
        ))),
        (
            IOMMU_CACHE_INV_TYPE_IOTLB,
            InvGranularity::Addr {
                pasid: Some(pasid),
                addr,
                granule_size,
                nb_granules,
                leaf,
                ..
            },
        ) => {
            if granule_size == 0 || granule_size % PAGE != 0 || addr % PAGE != 0 {
                return Err(Errno::EINVAL);
            }
            let npages = (granule_size / PAGE)
                .checked_mul(nb_granules)
                .ok_or(Errno::EINVAL)?;
            Ok(Some((
                pasid,
                IommuHwptVtdS1Invalidate {
                    addr,
                    npages,
                    flags: if leaf { IOMMU_VTD_INV_FLAGS_LEAF } else { 0 },
                    __reserved: 0,
                },
            )))
        }
        _ => Err(Errno::EINVAL),
    }
}

/// The stage-1 data of a nested HWPT for a bind: the guest table, its address width and
/// SRE/EAFE, with WPE when `wpe`. iommufd's VT-d data has no memory-type fields (the
/// host programs them itself).
fn vtd_s1(bind: &BindGpasid, wpe: bool) -> IommuHwptVtdS1 {
    let flags = [
        (
            bind.vtd_flags & IOMMU_SVA_VTD_GPASID_SRE != 0,
            IOMMU_VTD_S1_SRE,
        ),
        (
            bind.vtd_flags & IOMMU_SVA_VTD_GPASID_EAFE != 0,
            IOMMU_VTD_S1_EAFE,
        ),
        (wpe, IOMMU_VTD_S1_WPE),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .fold(0, |acc, (_, f)| acc | f);
    IommuHwptVtdS1 {
        flags,
        pgtbl_addr: bind.gpgd.0,
        addr_width: bind.addr_width,
        __reserved: 0,
    }
}

/// One passthrough device on the VM's iommufd: its cdev, device id, nest parent, and the
/// nested HWPT attached at each bound PASID.
pub struct IommufdDevice {
    fd: Arc<Iommufd>,
    cdev: Arc<dyn UapiFile>,
    dev_id: u32,
    sid: SourceId,
    parent: u32,
    hwpts: Mutex<BTreeMap<Pasid, u32>>,
}

impl fmt::Debug for IommufdDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IommufdDevice")
            .field("sid", &self.sid)
            .field("dev_id", &self.dev_id)
            .field("parent", &self.parent)
            .field("hwpts", &*lock(&self.hwpts))
            .finish_non_exhaustive()
    }
}

impl IommufdDevice {
    /// The device id in the iommufd.
    pub fn dev_id(&self) -> u32 {
        self.dev_id
    }

    /// The nest-parent HWPT its RID is attached to.
    pub fn parent(&self) -> u32 {
        self.parent
    }

    /// The nested HWPT attached at each bound PASID.
    pub fn nested_hwpts(&self) -> Vec<(Pasid, u32)> {
        lock(&self.hwpts).iter().map(|(&p, &h)| (p, h)).collect()
    }

    fn attach_pasid(&self, pasid: Pasid, hwpt: u32) -> Result<(), Errno> {
        self.cdev
            .device_attach_pt(hwpt, Some(pasid.raw()))
            .map(drop)
    }

    fn detach(&self, pasid: Option<Pasid>) -> Result<(), Errno> {
        self.cdev.device_detach_pt(pasid.map(Pasid::raw))
    }
}

impl Drop for IommufdDevice {
    /// What is still attached is detached and destroyed, the RID last with its parent.
    fn drop(&mut self) {
        let hwpts = std::mem::take(&mut *lock(&self.hwpts));
        for (pasid, hwpt) in hwpts {
            let _ = self.detach(Some(pasid));
            let _ = self.fd.file.destroy(hwpt);
        }
        let _ = self.detach(None);
        let _ = self.fd.file.destroy(self.parent);
        self.fd.fault.remove_device(self.dev_id);
    }
}

impl PasidSource for IommufdDevice {
    fn pasid_alloc(&self, min: u32, max: u32) -> Result<Pasid, Errno> {
        self.fd.pasids.pasid_alloc(min, max)
    }

    fn pasid_free(&self, pasid: Pasid) -> Result<(), Errno> {
        self.fd.pasids.pasid_free(pasid)
    }
}

impl HostSva for IommufdDevice {
    fn bind_gpasid(&self, bind: &BindGpasid) -> Result<(), Errno> {
        self.bind_first_level(bind, false)
    }

    /// A nested HWPT of the entry, attached at the PASID (replacing the HWPT attached
    /// there, which is then destroyed). A refused attach destroys the new HWPT and leaves
    /// the PASID as it was.
    fn bind_first_level(&self, bind: &BindGpasid, wpe: bool) -> Result<(), Errno> {
        let pasid = bind.hpasid;
        let hwpt = self
            .fd
            .alloc_nested(self.dev_id, self.parent, &vtd_s1(bind, wpe))?;
        if let Err(e) = self.attach_pasid(pasid, hwpt) {
            let _ = self.fd.file.destroy(hwpt);
            return Err(e);
        }
        if let Some(old) = lock(&self.hwpts).insert(pasid, hwpt) {
            if let Err(e) = self.fd.file.destroy(old) {
                tracing::warn!("iommufd: destroying replaced HWPT {old}: {e}");
            }
        }
        Ok(())
    }

    /// Detaches the PASID and destroys its HWPT; ENOENT when nothing is attached there.
    fn unbind_gpasid(&self, bind: &BindGpasid) -> Result<(), Errno> {
        let pasid = bind.hpasid;
        let hwpt = *lock(&self.hwpts).get(&pasid).ok_or(Errno::ENOENT)?;
        self.detach(Some(pasid))?;
        lock(&self.hwpts).remove(&pasid);
        self.fd.file.destroy(hwpt)
    }

    fn cache_invalidate(&self, inv: &CacheInvalidate) -> Result<(), Errno> {
        self.cache_invalidate_batch(std::slice::from_ref(inv))
            .pop()
            .unwrap_or(Err(Errno::EIO))
    }

    /// One `IOMMU_HWPT_INVALIDATE` array per nested HWPT, HWPTs in the order first asked;
    /// an entry the host refuses gets its errno and the entries after it go down again.
    fn cache_invalidate_batch(&self, invs: &[CacheInvalidate]) -> Vec<Result<(), Errno>> {
        let mut results = vec![Ok(()); invs.len()];
        let mut arrays: Vec<(u32, Vec<usize>, Vec<IommuHwptVtdS1Invalidate>)> = Vec::new();
        let hwpts = lock(&self.hwpts).clone();
        for (i, inv) in invs.iter().enumerate() {
            let (pasid, entry) = match entry_of(inv) {
                Ok(Some(e)) => e,
                Ok(None) => continue,
                Err(e) => {
                    results[i] = Err(e);
                    continue;
                }
            };
            let Some(&hwpt) = hwpts.get(&pasid) else {
                results[i] = Err(Errno::ENOENT);
                continue;
            };
            match arrays.iter_mut().find(|(h, _, _)| *h == hwpt) {
                Some((_, at, entries)) => {
                    at.push(i);
                    entries.push(entry);
                }
                None => arrays.push((hwpt, vec![i], vec![entry])),
            }
        }
        for (hwpt, at, entries) in arrays {
            let mut from = 0;
            while from < entries.len() {
                match self.fd.invalidate(hwpt, &entries[from..]) {
                    Ok(()) => break,
                    Err((k, e)) => {
                        results[at[from + k]] = Err(e);
                        from += k + 1;
                    }
                }
            }
        }
        results
    }

    fn carries_wpe(&self) -> bool {
        true
    }

    fn replaces_binding(&self) -> bool {
        true
    }

    fn page_response(&self, host_sid: SourceId, resp: &PageResponse) -> Result<(), Errno> {
        self.fd.fault.respond(host_sid, resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn invalidations_become_stage1_entries() {
        let p = Pasid::new(7).unwrap();
        let addr = |addr, granule_size, nb_granules, leaf| CacheInvalidate {
            cache: IOMMU_CACHE_INV_TYPE_IOTLB,
            granularity: InvGranularity::Addr {
                pasid: Some(p),
                archid: None,
                addr,
                granule_size,
                nb_granules,
                leaf,
            },
        };
        let e = entry_of(&addr(0x5000, 4096, 3, true)).unwrap().unwrap();
        assert_eq!(
            (e.0, e.1.addr, e.1.npages, e.1.flags),
            (p, 0x5000, 3, IOMMU_VTD_INV_FLAGS_LEAF)
        );
        let e = entry_of(&addr(0x20_0000, 2 << 20, 1, false))
            .unwrap()
            .unwrap();
        assert_eq!((e.1.npages, e.1.flags), (512, 0));
        let whole = CacheInvalidate {
            cache: IOMMU_CACHE_INV_TYPE_IOTLB,
            granularity: InvGranularity::Pasid {
                pasid: Some(p),
                archid: None,
            },
        };
        let e = entry_of(&whole).unwrap().unwrap();
        assert_eq!((e.1.addr, e.1.npages), (0, u64::MAX));
        let dev = CacheInvalidate {
            cache: IOMMU_CACHE_INV_TYPE_DEV_IOTLB,
            ..whole
        };
        assert_eq!(entry_of(&dev).unwrap(), None);
        assert_eq!(entry_of(&addr(0x5001, 4096, 1, false)), Err(Errno::EINVAL));
        assert_eq!(entry_of(&addr(0, 512, 1, false)), Err(Errno::EINVAL));
        assert_eq!(
            entry_of(&addr(0, 8192, u64::MAX, false)),
            Err(Errno::EINVAL)
        );
        let domain = CacheInvalidate {
            cache: IOMMU_CACHE_INV_TYPE_IOTLB,
            granularity: InvGranularity::Domain,
        };
        assert_eq!(entry_of(&domain), Err(Errno::EINVAL));
    }
}
