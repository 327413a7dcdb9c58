//! A VFIO container: the ownership layer between a VM's VMM and the host IOMMU driver.
//!
//! It does what `vfio_iommu_type1.c` (with the seed series) and the ioasid sets do in
//! Linux: decode and validate each ioctl's bytes, keep the container's DMA mappings, bound
//! PASIDs and attached PASID table, make sure a container only touches PASIDs of its own
//! VM's set, and call the [`IommuBackend`] (the host IOMMU driver) to program the hardware.
//!
//! Page requests of the container's devices reach the VMM through the container's fault
//! queue ([`crate::fault`]): the driver reports them to the [`FaultSink`] it was given, the
//! VMM reads them with [`Container::read_faults`] and answers each group with
//! [`Container::page_response`].
//!
//! Every ioctl either succeeds or fails with the state (container, allocator, backend, and
//! the argument bytes) unchanged: all checks run before the first change, and each change
//! after the backend's fallible call is infallible.

use smallvec::SmallVec;
use std::collections::BTreeMap;
use std::mem::{offset_of, size_of};
use std::sync::{Arc, Mutex, MutexGuard};

use vsva_uapi::{
    error::UapiError, file::IommuModel, file::VfioIoctls, request::FaultEvent,
    request::QueuedFault, request::UnrecoverableEvent,
};
use vsva_vtd::{addr::Iova, addr::Pasid, addr::SourceId};

use crate::binds::GpasidBinds;
use crate::error::HostError;
use crate::fault::{FaultNotifier, FaultQueue, FaultSink};
use crate::pasid::{PasidAllocator, PasidSetId};
use vsva_uapi::iommu::IommuNestingInfo;
use vsva_uapi::request::{
    BindGpasid, CacheInvalidate, DmaMap, NestingInfo, PageRequest, PageResponse, PageResponseCode,
    PasidConfig, PasidTableConfig,
};
use vsva_uapi::vfio::*;
use vsva_uapi::wire::write_into;

/// The PASID allocator, shared by every container of the host.
pub type SharedPasidAllocator = Arc<Mutex<PasidAllocator>>;

/// Most DMA mappings one container may hold (type1's `dma_entry_limit` default, `U16_MAX`).
pub const DMA_ENTRY_LIMIT: usize = u16::MAX as usize;

/// What the host IOMMU offers a container.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendInfo {
    /// Bitmap of page sizes the second level can map (bit n = 2^n bytes).
    pub iova_pgsizes: u64,
    /// Nested translation, when the IOMMU supports it.
    pub nesting: Option<NestingInfo>,
}

/// The host IOMMU driver, as one container sees it: the Rust counterpart of the `iommu_ops`
/// and `iommu_domain` calls `vfio_iommu_type1` makes.
///
/// Binds, invalidations and mappings apply to every device attached to the container.
///
/// Contract, which the container guarantees on its side:
/// - every PASID passed in belongs to the container's set, and the data is validated;
/// - `attach_device` is called only for a device not attached to this container, and
///   `detach_device` only for one that is;
/// - `page_response` is called only for the last request of a group the driver reported
///   through the container's [`FaultSink`] and that no response answered yet, with a
///   response that matches it;
/// - `unmap_dma` is called only with the exact range of an earlier successful `map_dma`,
///   `unbind_gpasid` only with the data of an earlier successful `bind_gpasid`, and
///   `detach_pasid_table` only after a successful `attach_pasid_table`;
///
/// and on the driver's side:
/// - a method that returns an error has changed nothing;
/// - the teardown methods cannot fail, as in Linux: they release what a successful call set
///   up, and the hardware state they remove is known to exist.
///
/// Optional operations default to `-ENODEV`, as the IOMMU core answers when an `iommu_ops`
/// callback is absent (a VT-d driver has no `attach_pasid_table`).
pub trait IommuBackend {
    /// Page sizes and nesting support.
    fn info(&self) -> BackendInfo;

    /// Maps `map.size` bytes of the caller's memory at `map.vaddr` to `map.iova` in the
    /// container's second level (resolving and pinning the user pages).
    fn map_dma(&mut self, map: &DmaMap) -> Result<(), HostError>;

    /// Removes an earlier mapping, invalidating the caches that held it.
    fn unmap_dma(&mut self, iova: Iova, size: u64);

    /// Sets up `bind.hpasid` for nested translation: the guest's first-level table at
    /// `bind.gpgd`, walked through the container's second level.
    fn bind_gpasid(&mut self, bind: &BindGpasid) -> Result<(), HostError>;

    /// Tears down a binding, invalidating the caches that held it.
    fn unbind_gpasid(&mut self, bind: &BindGpasid);

    /// Propagates a guest first-level invalidation to the host caches.
    fn cache_invalidate(&mut self, inv: &CacheInvalidate) -> Result<(), HostError>;

    /// Installs (or replaces) a guest-owned PASID table.
    fn attach_pasid_table(&mut self, cfg: &PasidTableConfig) -> Result<(), HostError> {
        let _ = cfg;
        Err(HostError::NoDriverOp("attach_pasid_table"))
    }

    /// Removes the guest-owned PASID table.
    fn detach_pasid_table(&mut self) {}

    /// Attaches a device (its requester id) to the container's domain, as `iommu_attach_group`
    /// does when a VFIO group joins the container: from then on the device translates
    /// through the container's second level and every PASID bound in the container. A device
    /// that another container (domain) holds is refused with `-EBUSY`.
    fn attach_device(&mut self, sid: SourceId) -> Result<(), HostError> {
        let _ = sid;
        Err(HostError::NoDriverOp("attach_device"))
    }

    /// Detaches a device: its context entry, and the PASID entries the container's bindings
    /// put there, are removed and the caches that held them invalidated.
    fn detach_device(&mut self, sid: SourceId) {
        let _ = sid;
    }

    /// Receives the container's fault sink, once, when the container is created. The driver
    /// reports through it each page request of the container's devices (from its page
    /// request handler, on any thread), and answers itself, with `IOMMU_PAGE_RESP_INVALID`,
    /// the groups of requests the sink refuses.
    fn set_fault_sink(&mut self, sink: FaultSink) {
        let _ = sink;
    }

    /// Sends a page group response to device `sid` (VT-d page group response descriptor,
    /// §6.5.2.9) for the group whose last request, `request`, the driver reported through
    /// the sink (its private data goes back with the response); `response.pasid` is set
    /// exactly when the group's request needs its PASID back.
    fn page_response(
        &mut self,
        sid: SourceId,
        request: &PageRequest,
        response: &PageResponse,
    ) -> Result<(), HostError> {
        let _ = (sid, request, response);
        Err(HostError::NoDriverOp("page_response"))
    }
}

/// A snapshot of what a container holds, for diagnostics and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerState {
    /// The IOMMU model, once set.
    pub model: Option<IommuModel>,
    /// DMA mappings by IOVA.
    pub dma: Vec<DmaMap>,
    /// Bound PASIDs with their bind data.
    pub bound: Vec<BindGpasid>,
    /// The attached guest PASID table.
    pub pasid_table: Option<PasidTableConfig>,
    /// The PASIDs of the container's set.
    pub pasids: Vec<Pasid>,
}

/// One VM's VFIO container.
#[derive(Debug)]
pub struct Container<B: IommuBackend> {
    backend: B,
    allocator: SharedPasidAllocator,
    set: PasidSetId,
    model: Option<IommuModel>,
    dma: BTreeMap<u64, DmaMap>,
    bound: GpasidBinds,
    pasid_table: Option<PasidTableConfig>,
    faults: FaultQueue,
}

/// Locks the allocator; a poisoned lock is still consistent (no allocator method panics
/// half-way), so it is used as is.
fn lock(allocator: &SharedPasidAllocator) -> MutexGuard<'_, PasidAllocator> {
    allocator
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The `unsigned long` argument of `VFIO_CHECK_EXTENSION` and `VFIO_SET_IOMMU`, passed as
/// its 8 little-endian bytes.
fn int_arg(arg: &[u8]) -> Result<u64, HostError> {
    let bytes: [u8; 8] = arg.try_into().map_err(|_| {
        HostError::field(
            "integer ioctl argument",
            format!("{} bytes given, 8 expected", arg.len()),
        )
    })?;
    Ok(u64::from_le_bytes(bytes))
}

/// What an ioctl needs of the container before its handler runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Needs {
    /// Nothing: a container-level ioctl.
    Nothing,
    /// An IOMMU model (`VFIO_SET_IOMMU` done), else `-EINVAL`.
    Model,
    /// The `VFIO_TYPE1_NESTING_IOMMU` model, else `-EOPNOTSUPP`.
    Nesting,
}

/// The `minsz` of `VFIO_IOMMU_GET_INFO`: up to `iova_pgsizes`.
const GET_INFO_MINSZ: usize = offset_of!(VfioIommuType1Info, iova_pgsizes) + size_of::<u64>();
/// The `minsz` of `VFIO_IOMMU_CACHE_INVALIDATE`: the header and the info's fixed part.
const CACHE_INVALIDATE_MINSZ: usize = offset_of!(VfioIommuType1CacheInvalidate, info)
    + offset_of!(vsva_uapi::iommu::IommuCacheInvalidateInfo, granu);
/// The `minsz` of `VFIO_IOMMU_PAGE_RESPONSE`: the header before the response.
const PAGE_RESPONSE_MINSZ: usize = offset_of!(VfioIommuType1PageResponse, response);

/// One row of the ioctl table.
struct IoctlOp<B: IommuBackend> {
    cmd: u32,
    name: &'static str,
    needs: Needs,
    min_size: usize,
    handler: fn(&mut Container<B>, &mut [u8]) -> Result<usize, HostError>,
}

impl<B: IommuBackend> IoctlOp<B> {
    const fn new(
        cmd: u32,
        name: &'static str,
        needs: Needs,
        min_size: usize,
        handler: fn(&mut Container<B>, &mut [u8]) -> Result<usize, HostError>,
    ) -> Self {
        IoctlOp {
            cmd,
            name,
            needs,
            min_size,
            handler,
        }
    }
}

impl<B: IommuBackend> Container<B> {
    /// A new container for one VM, with a fresh PASID set of `quota` PASIDs in `allocator`.
    ///
    /// The backend receives the container's [`FaultSink`] through
    /// [`IommuBackend::set_fault_sink`].
    ///
    /// Errors: the allocator has no room for another set (ENOSPC, see
    /// [`PasidAllocator::create_set`](crate::pasid::PasidAllocator::create_set)).
    pub fn new(
        allocator: SharedPasidAllocator,
        quota: u32,
        mut backend: B,
    ) -> Result<Self, HostError> {
        let set = lock(&allocator).create_set(quota)?;
        let faults = FaultQueue::new();
        backend.set_fault_sink(faults.sink());
        Ok(Container {
            backend,
            allocator,
            set,
            model: None,
            dma: BTreeMap::new(),
            bound: GpasidBinds::default(),
            pasid_table: None,
            faults,
        })
    }

    /// The container's PASID set.
    pub fn pasid_set(&self) -> PasidSetId {
        self.set
    }

    /// The host IOMMU driver behind the container.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// What the container holds.
    pub fn state(&self) -> ContainerState {
        let pasids = lock(&self.allocator)
            .owned_in(self.set, 0, Pasid::MAX.raw())
            .unwrap_or_default();
        ContainerState {
            model: self.model,
            dma: self.dma.values().copied().collect(),
            bound: self.bound.iter().copied().collect(),
            pasid_table: self.pasid_table,
            pasids,
        }
    }

    /// The devices attached to the container, by requester id.
    pub fn devices(&self) -> Vec<SourceId> {
        self.faults.devices()
    }

    /// Attaches a device to the container, as `VFIO_GROUP_SET_CONTAINER` does for its group:
    /// `-EBUSY` if it is attached already; the driver's refusal (e.g. `-EBUSY` for a device
    /// of another container, `-ENODEV` without the operation) changes nothing.
    pub fn attach_device(&mut self, sid: SourceId) -> Result<(), HostError> {
        if self.faults.has_device(sid) {
            return Err(HostError::DeviceAttached(sid));
        }
        self.backend.attach_device(sid)?;
        self.faults.attach(sid);
        Ok(())
    }

    /// Detaches a device, as `VFIO_GROUP_UNSET_CONTAINER` does for its group (`-EINVAL` if it
    /// is not attached). The device's unread page requests are dropped and its pending
    /// groups answered with `IOMMU_PAGE_RESP_INVALID`; the container's bindings stay for its
    /// other devices.
    pub fn detach_device(&mut self, sid: SourceId) -> Result<(), HostError> {
        if !self.faults.has_device(sid) {
            return Err(HostError::DeviceNotAttached(sid));
        }
        let pending = self.faults.detach(sid);
        answer_invalid(&mut self.backend, pending);
        self.backend.detach_device(sid);
        Ok(())
    }

    /// A handle on the container's fault queue, the one the backend was given.
    pub fn fault_sink(&self) -> FaultSink {
        self.faults.sink()
    }

    /// Takes the page requests reported since the last read, oldest first. They only ever
    /// come from the container's devices and carry PASIDs of its set.
    pub fn read_faults(&mut self) -> Vec<FaultEvent> {
        self.faults.read()
    }

    /// Takes the unrecoverable faults reported since the last read, oldest first. They only
    /// ever come from the container's devices and carry PASIDs of its set.
    pub fn read_unrecoverable_faults(&mut self) -> Vec<UnrecoverableEvent> {
        self.faults.read_unrecoverable()
    }

    /// Unrecoverable faults the driver reported while their queue was full, which were
    /// dropped (counted from the container's creation).
    pub fn unrecoverable_faults_lost(&self) -> u64 {
        self.faults.unrecoverable_lost()
    }

    /// Takes at most `max` of the records (page requests and unrecoverable faults) reported
    /// since the last read, in the order they were reported, handing each to `each`;
    /// returns how many.
    pub(crate) fn take_records(&mut self, max: usize, each: impl FnMut(QueuedFault)) -> usize {
        self.faults.take_records(max, each)
    }

    /// Fault records (page requests and unrecoverable faults) queued and not read yet.
    pub fn unread_faults(&self) -> usize {
        self.faults.unread()
    }

    /// The page request groups waiting for a response (the last request of each), oldest
    /// first.
    pub fn pending_page_requests(&self) -> Vec<FaultEvent> {
        self.faults.pending()
    }

    /// Registers `notify`, called once for each page request the container accepts, as
    /// VFIO signals the eventfd of its fault region; it replaces an earlier one. It runs on
    /// the driver's reporting thread, possibly inside a call on this container (a driver may
    /// drain its page request queue there): it should only signal, e.g. write an eventfd or
    /// send on a channel, and never wait for the container.
    pub fn set_fault_notifier(&mut self, notify: impl Fn() + Send + Sync + 'static) {
        let notifier: FaultNotifier = Arc::new(notify);
        self.faults.set_notifier(Some(notifier));
    }

    /// Removes the fault notifier.
    pub fn clear_fault_notifier(&mut self) {
        self.faults.set_notifier(None);
    }

    /// Performs one container ioctl on its argument bytes, as `ioctl(container_fd, cmd, arg)`
    /// does; returns the ioctl's non-negative result.
    ///
    /// `arg` holds the structure the argument points to (input, and output where the ioctl
    /// writes back). `VFIO_CHECK_EXTENSION` and `VFIO_SET_IOMMU` take an integer: `arg` is
    /// then its 8 little-endian bytes. Argument-less ioctls ignore `arg`.
    pub fn ioctl(&mut self, cmd: u32, arg: &mut [u8]) -> Result<usize, HostError> {
        let op = Self::IOCTLS.iter().find(|op| op.cmd == cmd);
        if op.is_none_or(|op| op.needs != Needs::Nothing) {
            // As in VFIO, every ioctl but the container's own goes to the IOMMU model, even
            // an unknown one (`-EINVAL` while there is none, `-ENOTTY` from the model).
            let model = self.model.ok_or(HostError::NoIommuModel)?;
            let op = op.ok_or(HostError::UnknownIoctl(cmd))?;
            if op.needs == Needs::Nesting && model != IommuModel::Type1Nesting {
                return Err(HostError::NotNesting(op.name));
            }
        }
        let op = op.ok_or(HostError::UnknownIoctl(cmd))?;
        if arg.len() < op.min_size {
            return Err(UapiError::BufferTooShort {
                what: op.name,
                len: arg.len(),
                need: op.min_size,
            }
            .into());
        }
        (op.handler)(self, arg)
    }

    /// The container ioctls: number, what they need, the argument bytes copied in before
    /// anything else (a shorter buffer faults, `-EFAULT`), and the handler. Adding an ioctl
    /// is one line here.
    const IOCTLS: [IoctlOp<B>; 13] = [
        IoctlOp::new(
            VFIO_GET_API_VERSION,
            "VFIO_GET_API_VERSION",
            Needs::Nothing,
            0,
            |_, _| Ok(VFIO_API_VERSION as usize),
        ),
        IoctlOp::new(
            VFIO_CHECK_EXTENSION,
            "VFIO_CHECK_EXTENSION",
            Needs::Nothing,
            0,
            |c, arg| Ok(usize::from(c.has_extension(int_arg(arg)?))),
        ),
        IoctlOp::new(
            VFIO_SET_IOMMU,
            "VFIO_SET_IOMMU",
            Needs::Nothing,
            0,
            |c, arg| c.set_iommu_model(int_arg(arg)?),
        ),
        IoctlOp::new(
            VFIO_IOMMU_GET_INFO,
            "VFIO_IOMMU_GET_INFO",
            Needs::Model,
            GET_INFO_MINSZ,
            Self::do_get_info,
        ),
        IoctlOp::new(
            VFIO_IOMMU_MAP_DMA,
            "VFIO_IOMMU_MAP_DMA",
            Needs::Model,
            size_of::<VfioIommuType1DmaMap>(),
            Self::do_map_dma,
        ),
        IoctlOp::new(
            VFIO_IOMMU_UNMAP_DMA,
            "VFIO_IOMMU_UNMAP_DMA",
            Needs::Model,
            size_of::<VfioIommuType1DmaUnmap>(),
            Self::do_unmap_dma,
        ),
        IoctlOp::new(
            VFIO_IOMMU_ATTACH_PASID_TABLE,
            "VFIO_IOMMU_ATTACH_PASID_TABLE",
            Needs::Nesting,
            size_of::<VfioIommuType1AttachPasidTable>(),
            Self::do_attach_pasid_table,
        ),
        IoctlOp::new(
            VFIO_IOMMU_DETACH_PASID_TABLE,
            "VFIO_IOMMU_DETACH_PASID_TABLE",
            Needs::Nesting,
            0,
            Self::do_detach_pasid_table,
        ),
        IoctlOp::new(
            VFIO_IOMMU_CACHE_INVALIDATE,
            "VFIO_IOMMU_CACHE_INVALIDATE",
            Needs::Nesting,
            CACHE_INVALIDATE_MINSZ,
            Self::do_cache_invalidate,
        ),
        IoctlOp::new(
            VFIO_IOMMU_PASID_REQUEST,
            "VFIO_IOMMU_PASID_REQUEST",
            Needs::Nesting,
            size_of::<VfioIommuType1PasidRequest>(),
            Self::do_pasid_request,
        ),
        IoctlOp::new(
            VFIO_IOMMU_BIND,
            "VFIO_IOMMU_BIND",
            Needs::Nesting,
            size_of::<VfioIommuType1Bind>(),
            Self::do_bind,
        ),
        IoctlOp::new(
            VFIO_IOMMU_UNBIND,
            "VFIO_IOMMU_UNBIND",
            Needs::Nesting,
            size_of::<VfioIommuType1Bind>(),
            Self::do_unbind,
        ),
        IoctlOp::new(
            VFIO_IOMMU_PAGE_RESPONSE,
            "VFIO_IOMMU_PAGE_RESPONSE",
            Needs::Nesting,
            PAGE_RESPONSE_MINSZ,
            Self::do_page_response,
        ),
    ];

    fn has_extension(&self, ext: u64) -> bool {
        match ext {
            VFIO_TYPE1V2_IOMMU => true,
            VFIO_TYPE1_NESTING_IOMMU => self.backend.info().nesting.is_some(),
            _ => false,
        }
    }

    fn set_iommu_model(&mut self, id: u64) -> Result<usize, HostError> {
        if self.model.is_some() {
            return Err(HostError::IommuModelSet);
        }
        let model = match id {
            VFIO_TYPE1V2_IOMMU => IommuModel::Type1v2,
            VFIO_TYPE1_NESTING_IOMMU if self.backend.info().nesting.is_some() => {
                IommuModel::Type1Nesting
            }
            _ => return Err(HostError::UnsupportedIommuModel(id)),
        };
        self.model = Some(model);
        Ok(0)
    }

    /// `VFIO_IOMMU_GET_INFO` as v5.10 `vfio_iommu_type1_get_info`: flags and page sizes,
    /// then the capability chain if `argsz` leaves room for it, else `argsz` raised to the
    /// size needed. Only the fields `argsz` covers are written back.
    fn do_get_info(&mut self, arg: &mut [u8]) -> Result<usize, HostError> {
        const WHAT: &str = "vfio_iommu_type1_info";
        let model = self.model.ok_or(HostError::NoIommuModel)?;
        let req = VfioIommuType1Info::from_bytes(arg)?;
        let info = self.backend.info();
        let capsz = offset_of!(VfioIommuType1Info, cap_offset) + size_of::<u32>();
        let minsz = if req.argsz as usize >= capsz {
            capsz
        } else {
            offset_of!(VfioIommuType1Info, iova_pgsizes) + size_of::<u64>()
        };
        let mut out = VfioIommuType1Info {
            argsz: req.argsz,
            flags: VFIO_IOMMU_INFO_PGSIZES,
            iova_pgsizes: info.iova_pgsizes,
            cap_offset: 0,
            pad: 0,
        };
        let cap = match (model, info.nesting) {
            (IommuModel::Type1Nesting, Some(n)) => Some(VfioIommuType1InfoCapNesting {
                header: VfioInfoCapHeader {
                    id: VFIO_IOMMU_TYPE1_INFO_CAP_NESTING,
                    version: VFIO_IOMMU_TYPE1_INFO_CAP_NESTING_VERSION,
                    next: 0,
                },
                info: IommuNestingInfo::from(&n),
            }),
            _ => None,
        };
        let info_size = size_of::<VfioIommuType1Info>();
        let mut cap_at = None;
        if let Some(cap) = cap {
            out.flags |= VFIO_IOMMU_INFO_CAPS;
            let total = info_size + size_of::<VfioIommuType1InfoCapNesting>();
            if (req.argsz as usize) < total {
                out.argsz = total as u32;
            } else {
                if arg.len() < total {
                    return Err(UapiError::BufferTooShort {
                        what: WHAT,
                        len: arg.len(),
                        need: total,
                    }
                    .into());
                }
                out.cap_offset = info_size as u32;
                cap_at = Some(cap);
            }
        }
        if let Some(cap) = cap_at {
            write_into(&cap, &mut arg[info_size..], WHAT)?;
        }
        let image = out.to_bytes();
        arg[..minsz].copy_from_slice(&image[..minsz]);
        Ok(0)
    }

    /// `VFIO_IOMMU_MAP_DMA`: a new mapping that overlaps none (EEXIST), within the entry
    /// limit (ENOSPC), aligned to the IOMMU's smallest page.
    fn do_map_dma(&mut self, arg: &mut [u8]) -> Result<usize, HostError> {
        let map = DmaMap::try_from(&VfioIommuType1DmaMap::from_bytes(arg)?)?;
        let min_page = 1u64 << self.backend.info().iova_pgsizes.trailing_zeros().min(63);
        if (map.iova.raw() | map.vaddr | map.size) & (min_page - 1) != 0 {
            return Err(HostError::field(
                "vfio_iommu_type1_dma_map",
                format!("not aligned to the IOMMU page size {min_page:#x}"),
            ));
        }
        let last = map.iova.raw() + (map.size - 1);
        let overlaps = self
            .dma
            .range(..=last)
            .next_back()
            .is_some_and(|(&start, m)| start + (m.size - 1) >= map.iova.raw());
        if overlaps {
            return Err(HostError::DmaExists {
                iova: map.iova.raw(),
                size: map.size,
            });
        }
        if self.dma.len() >= DMA_ENTRY_LIMIT {
            return Err(HostError::DmaLimit(DMA_ENTRY_LIMIT));
        }
        self.backend.map_dma(&map)?;
        self.dma.insert(map.iova.raw(), map);
        Ok(0)
    }

    /// `VFIO_IOMMU_UNMAP_DMA` with type1 v2 semantics: the range may not split a mapping
    /// (EINVAL); every mapping inside it is removed; `size` returns the bytes unmapped.
    fn do_unmap_dma(&mut self, arg: &mut [u8]) -> Result<usize, HostError> {
        let req = VfioIommuType1DmaUnmap::from_bytes(arg)?;
        let (iova, last) = (req.iova, req.iova + (req.size - 1));
        let splits_start = self
            .dma
            .range(..iova)
            .next_back()
            .is_some_and(|(&start, m)| start + (m.size - 1) >= iova);
        let splits_end = self
            .dma
            .range(..=last)
            .next_back()
            .is_some_and(|(&start, m)| start + (m.size - 1) > last);
        if splits_start || splits_end {
            return Err(HostError::UnmapSplits {
                iova,
                size: req.size,
            });
        }
        let starts: Vec<u64> = self.dma.range(iova..=last).map(|(&s, _)| s).collect();
        let mut unmapped = 0;
        for start in starts {
            if let Some(m) = self.dma.remove(&start) {
                self.backend.unmap_dma(m.iova, m.size);
                unmapped += m.size;
            }
        }
        let size_at = offset_of!(VfioIommuType1DmaUnmap, size);
        arg[size_at..size_at + 8].copy_from_slice(&unmapped.to_le_bytes());
        Ok(0)
    }

    /// `VFIO_IOMMU_PASID_REQUEST`. ALLOC returns the lowest free PASID of the range.
    /// FREE releases the caller's PASIDs in the range, answering their pending page request
    /// groups (`IOMMU_PAGE_RESP_INVALID`) and unbinding bound ones first; a
    /// single-PASID free (`min == max`) of a PASID the caller does not own is EPERM, as in
    /// the seed, while a wider range skips PASIDs of others, as v6's `vfio_pasid_free_range`.
    fn do_pasid_request(&mut self, arg: &mut [u8]) -> Result<usize, HostError> {
        let req = VfioIommuType1PasidRequest::from_bytes(arg)?;
        let (min, max) = (req.range.min, req.range.max);
        let mut allocator = lock(&self.allocator);
        if req.flags == VFIO_IOMMU_FLAG_ALLOC_PASID {
            let pasid = allocator.alloc(self.set, min, max)?;
            self.faults.add_pasid(pasid);
            return Ok(pasid.raw() as usize);
        }
        // One PASID (the usual free) without a list on the heap.
        let victims: SmallVec<[Pasid; 1]> = if min == max {
            let pasid = Pasid::new(min).map_err(|e| HostError::field("PASID", e.to_string()))?;
            allocator.check_owner(self.set, pasid)?;
            smallvec::smallvec![pasid]
        } else {
            allocator.owned_in(self.set, min, max)?.into()
        };
        for pasid in victims {
            answer_invalid(&mut self.backend, self.faults.remove_pasid(pasid));
            if let Some(bind) = self.bound.remove(pasid) {
                self.backend.unbind_gpasid(&bind);
            }
            allocator.free(self.set, pasid)?;
        }
        Ok(0)
    }

    fn decode_bind(&self, arg: &[u8]) -> Result<BindGpasid, HostError> {
        let req = VfioBindGuestPasid::from_bytes(arg)?;
        let bind = BindGpasid::try_from(&req.data)?;
        lock(&self.allocator).check_owner(self.set, bind.hpasid)?;
        Ok(bind)
    }

    /// `VFIO_IOMMU_BIND` of a guest PASID: the host PASID must be the caller's (EPERM), not
    /// bound yet (EBUSY), and no guest PASID table may be attached (EBUSY).
    fn do_bind(&mut self, arg: &mut [u8]) -> Result<usize, HostError> {
        let bind = self.decode_bind(arg)?;
        if self.pasid_table.is_some() {
            return Err(HostError::ModelConflict(
                "a guest PASID table is attached: PASIDs cannot be bound one by one",
            ));
        }
        if self.bound.contains(bind.hpasid) {
            return Err(HostError::AlreadyBound(bind.hpasid));
        }
        self.backend.bind_gpasid(&bind)?;
        self.bound.insert(bind);
        Ok(0)
    }

    /// `VFIO_IOMMU_UNBIND` of a guest PASID: the host PASID must be the caller's (EPERM)
    /// and bound (EINVAL). The PASID's page request groups still waiting are answered
    /// `IOMMU_PAGE_RESP_INVALID` while it is bound (afterwards the driver could no longer
    /// answer them and the device would wait until the PASID is freed), its unread
    /// requests dropped, and what was bound is torn down.
    fn do_unbind(&mut self, arg: &mut [u8]) -> Result<usize, HostError> {
        let bind = self.decode_bind(arg)?;
        let bound = self
            .bound
            .remove(bind.hpasid)
            .ok_or(HostError::NotBound(bind.hpasid))?;
        answer_invalid(
            &mut self.backend,
            self.faults.drop_pasid_requests(bind.hpasid),
        );
        self.backend.unbind_gpasid(&bound);
        Ok(0)
    }

    /// `VFIO_IOMMU_CACHE_INVALIDATE`: an invalidation naming a PASID must name one of the
    /// caller's (EPERM); one naming none stays within the container's own domain. While a
    /// guest PASID table is attached the PASID is a SubstreamID of the guest's own table,
    /// not a host PASID, and the driver confines it to the container's streams and VMID.
    fn do_cache_invalidate(&mut self, arg: &mut [u8]) -> Result<usize, HostError> {
        let inv = CacheInvalidate::from_vfio_bytes(arg)?;
        if let (Some(pasid), None) = (inv.pasid(), &self.pasid_table) {
            lock(&self.allocator).check_owner(self.set, pasid)?;
        }
        self.backend.cache_invalidate(&inv)?;
        Ok(0)
    }

    /// `VFIO_IOMMU_ATTACH_PASID_TABLE`: installs or replaces the guest PASID table; refused
    /// while PASIDs are bound one by one (EBUSY) and by drivers without the operation
    /// (ENODEV, e.g. VT-d).
    fn do_attach_pasid_table(&mut self, arg: &mut [u8]) -> Result<usize, HostError> {
        let req = VfioIommuType1AttachPasidTable::from_bytes(arg)?;
        let cfg = PasidTableConfig::try_from(&req.config)?;
        if !self.bound.is_empty() {
            return Err(HostError::ModelConflict(
                "PASIDs are bound one by one: a guest PASID table cannot be attached",
            ));
        }
        self.backend.attach_pasid_table(&cfg)?;
        self.pasid_table = Some(cfg);
        let translating = matches!(cfg.config, PasidConfig::Translate { .. });
        let gone = self.faults.set_guest_table(translating);
        answer_invalid(&mut self.backend, gone);
        Ok(0)
    }

    /// `VFIO_IOMMU_DETACH_PASID_TABLE`: removes the guest PASID table if one is attached;
    /// with none attached (always so on VT-d, whose driver refuses the attach) there is
    /// nothing to undo and the ioctl returns 0.
    fn do_detach_pasid_table(&mut self, _arg: &mut [u8]) -> Result<usize, HostError> {
        if self.pasid_table.take().is_some() {
            let gone = self.faults.set_guest_table(false);
            answer_invalid(&mut self.backend, gone);
            self.backend.detach_pasid_table();
        }
        Ok(0)
    }

    /// `VFIO_IOMMU_PAGE_RESPONSE` (vsva extension): a response naming a PASID must name one
    /// of the caller's (EPERM; while a guest PASID table is attached any SubstreamID of it,
    /// as the fault queue took), and must answer a pending group (EINVAL): of the device the
    /// `rid` names, or else the oldest that matches, matched as `iommu_page_response` does
    /// (group index, and the PASID when the request needs it back; a PASID it does not need
    /// is cleared). The group is done once the driver has sent the response.
    fn do_page_response(&mut self, arg: &mut [u8]) -> Result<usize, HostError> {
        let req = VfioIommuType1PageResponse::from_bytes(arg)?;
        let mut resp = PageResponse::try_from(&req.response)?;
        let sid = (req.flags & VFIO_IOMMU_PAGE_RESPONSE_RID_VALID != 0)
            .then(|| SourceId::from_rid(req.rid as u16));
        if let (Some(pasid), None) = (resp.pasid, &self.pasid_table) {
            lock(&self.allocator).check_owner(self.set, pasid)?;
        }
        let (seq, event) = self.faults.find_pending(sid, &resp)?;
        if !event.request.needs_pasid {
            resp.pasid = None;
        }
        self.backend
            .page_response(event.sid, &event.request, &resp)?;
        self.faults.remove_pending(seq);
        Ok(0)
    }
}

/// The typed ioctls on the container itself, with the host's error detail (the
/// [`vsva_uapi::file::UapiFile`] of a container gives the errno only).
impl<B: IommuBackend> VfioIoctls for Container<B> {
    type Error = HostError;

    fn raw_ioctl(&mut self, cmd: u32, arg: &mut [u8]) -> Result<usize, HostError> {
        self.ioctl(cmd, arg)
    }
}

/// Answers page request groups whose PASID or device goes away, so that no device waits
/// for ever (`IOMMU_PAGE_RESP_INVALID`: do not retry). A driver without page responses
/// has nothing to answer.
fn answer_invalid<B: IommuBackend>(backend: &mut B, groups: Vec<FaultEvent>) {
    for FaultEvent { sid, request } in groups {
        let resp = PageResponse {
            pasid: request.pasid.filter(|_| request.needs_pasid),
            grpid: request.grpid,
            code: PageResponseCode::Invalid,
        };
        if let Err(e) = backend.page_response(sid, &request, &resp) {
            tracing::debug!(
                "answering page request group {} of {sid}: {e}",
                request.grpid
            );
        }
    }
}

/// Closing the container (or the VMM dying) releases everything it held, as
/// `vfio_iommu_type1_release` and the `vfio_mm` put do: pending page request groups
/// (answered `IOMMU_PAGE_RESP_INVALID`) and unread ones, bindings, the PASID table, the
/// devices, the DMA mappings, and the VM's PASID set. The fault sink refuses every report
/// from then on.
impl<B: IommuBackend> Drop for Container<B> {
    fn drop(&mut self) {
        let devices = self.faults.devices();
        let pending = self.faults.close();
        answer_invalid(&mut self.backend, pending);
        for bind in std::mem::take(&mut self.bound) {
            self.backend.unbind_gpasid(&bind);
        }
        if self.pasid_table.take().is_some() {
            let gone = self.faults.set_guest_table(false);
            answer_invalid(&mut self.backend, gone);
            self.backend.detach_pasid_table();
        }
        for sid in devices {
            self.backend.detach_device(sid);
        }
        for m in std::mem::take(&mut self.dma).into_values() {
            self.backend.unmap_dma(m.iova, m.size);
        }
        if let Err(e) = lock(&self.allocator).destroy_set(self.set) {
            tracing::warn!("closing container: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::FAULT_QUEUE_DEPTH;
    use proptest::prelude::*;
    use std::cell::RefCell;
    use std::collections::BTreeSet;
    use std::rc::Rc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use vsva_uapi::iommu::*;
    use vsva_uapi::request::{InvGranularity, PageRequest, PasidConfig};
    use vsva_uapi::{request::UnrecoverableFault, request::UnrecoverableReason};
    use vsva_vtd::addr::Gpa;

    /// What the mock IOMMU has been programmed with.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    struct MockState {
        mapped: BTreeMap<u64, DmaMap>,
        bound: BTreeMap<Pasid, BindGpasid>,
        table: Option<PasidTableConfig>,
        invalidations: Vec<CacheInvalidate>,
        devices: BTreeSet<SourceId>,
        responses: Vec<(SourceId, PageResponse)>,
        /// The private data of the request each response answered.
        returned_data: Vec<Option<[u64; 2]>>,
    }

    /// A host IOMMU driver stand-in that checks the container keeps the backend contract.
    /// It refuses maps of `vaddr` with bit 47 set (unbacked memory), binds with an address
    /// width other than 48 or 57, devices on bus 0xff (held by another domain), and page
    /// responses with the Failure code (as if the device had gone), changing nothing when
    /// it refuses. It keeps the fault sink it is given.
    #[derive(Clone, Debug)]
    struct MockIommu {
        state: Rc<RefCell<MockState>>,
        nesting: bool,
        smmu: bool,
        sink: Option<FaultSink>,
    }

    impl MockIommu {
        fn new(nesting: bool, smmu: bool) -> Self {
            MockIommu {
                state: Rc::default(),
                nesting,
                smmu,
                sink: None,
            }
        }
    }

    const NESTING: NestingInfo = NestingInfo {
        features: IOMMU_NESTING_FEAT_BIND_PGTBL | IOMMU_NESTING_FEAT_CACHE_INVLD,
        addr_width: 48,
        pasid_bits: 20,
        vendor: vsva_uapi::request::NestingVendor::IntelVtd {
            cap_reg: 0x00d2_008c_106f_0462,
            ecap_reg: 0x00f0_50da,
        },
    };

    impl IommuBackend for MockIommu {
        fn info(&self) -> BackendInfo {
            BackendInfo {
                iova_pgsizes: 0x4020_1000,
                nesting: self.nesting.then_some(NESTING),
            }
        }

        fn map_dma(&mut self, map: &DmaMap) -> Result<(), HostError> {
            if map.vaddr & (1 << 47) != 0 {
                return Err(HostError::Driver {
                    errno: libc::EFAULT,
                    detail: format!("vaddr {:#x} is not backed", map.vaddr),
                });
            }
            let mut s = self.state.borrow_mut();
            let end = map.iova.raw() + map.size;
            assert!(
                s.mapped
                    .values()
                    .all(|m| m.iova.raw() + m.size <= map.iova.raw() || m.iova.raw() >= end),
                "overlapping map reached the driver"
            );
            s.mapped.insert(map.iova.raw(), *map);
            Ok(())
        }

        fn unmap_dma(&mut self, iova: Iova, size: u64) {
            let m = self.state.borrow_mut().mapped.remove(&iova.raw());
            assert_eq!(
                m.map(|m| m.size),
                Some(size),
                "unmap of a range never mapped"
            );
        }

        fn bind_gpasid(&mut self, bind: &BindGpasid) -> Result<(), HostError> {
            if bind.addr_width != 48 && bind.addr_width != 57 {
                return Err(HostError::Driver {
                    errno: libc::EINVAL,
                    detail: format!("address width {}", bind.addr_width),
                });
            }
            let mut s = self.state.borrow_mut();
            assert!(s.table.is_none(), "bind with a PASID table attached");
            assert!(s.bound.insert(bind.hpasid, *bind).is_none(), "double bind");
            Ok(())
        }

        fn unbind_gpasid(&mut self, bind: &BindGpasid) {
            let b = self.state.borrow_mut().bound.remove(&bind.hpasid);
            assert_eq!(b.as_ref(), Some(bind), "unbind of something never bound");
        }

        fn cache_invalidate(&mut self, inv: &CacheInvalidate) -> Result<(), HostError> {
            self.state.borrow_mut().invalidations.push(*inv);
            Ok(())
        }

        fn attach_pasid_table(&mut self, cfg: &PasidTableConfig) -> Result<(), HostError> {
            if !self.smmu {
                return Err(HostError::NoDriverOp("attach_pasid_table"));
            }
            let mut s = self.state.borrow_mut();
            assert!(s.bound.is_empty(), "table attached over bound PASIDs");
            s.table = Some(*cfg);
            Ok(())
        }

        fn detach_pasid_table(&mut self) {
            assert!(self.state.borrow_mut().table.take().is_some());
        }

        fn attach_device(&mut self, sid: SourceId) -> Result<(), HostError> {
            if sid.bus() == 0xff {
                return Err(HostError::Driver {
                    errno: libc::EBUSY,
                    detail: format!("{sid} belongs to another domain"),
                });
            }
            let fresh = self.state.borrow_mut().devices.insert(sid);
            assert!(fresh, "double attach of {sid}");
            Ok(())
        }

        fn detach_device(&mut self, sid: SourceId) {
            let known = self.state.borrow_mut().devices.remove(&sid);
            assert!(known, "detach of {sid}, never attached");
        }

        fn set_fault_sink(&mut self, sink: FaultSink) {
            assert!(self.sink.replace(sink).is_none(), "second fault sink");
        }

        fn page_response(
            &mut self,
            sid: SourceId,
            request: &PageRequest,
            response: &PageResponse,
        ) -> Result<(), HostError> {
            let mut s = self.state.borrow_mut();
            assert!(s.devices.contains(&sid), "response to a detached device");
            if response.code == PageResponseCode::Failure {
                return Err(HostError::Driver {
                    errno: libc::EIO,
                    detail: "device gone".into(),
                });
            }
            s.responses.push((sid, *response));
            s.returned_data.push(request.private_data);
            Ok(())
        }
    }

    fn shared() -> SharedPasidAllocator {
        Arc::new(Mutex::new(PasidAllocator::new()))
    }

    fn nested(alloc: &SharedPasidAllocator) -> (Container<MockIommu>, Rc<RefCell<MockState>>) {
        let backend = MockIommu::new(true, false);
        let state = backend.state.clone();
        let mut c = Container::new(alloc.clone(), 8, backend).unwrap();
        c.set_iommu(IommuModel::Type1Nesting).unwrap();
        (c, state)
    }

    fn bind_of(p: Pasid) -> BindGpasid {
        BindGpasid {
            hpasid: p,
            gpasid: Some(p),
            gpgd: Gpa(0x7_3000),
            addr_width: 48,
            vtd_flags: IOMMU_SVA_VTD_GPASID_SRE,
            pat: 0,
            emt: 0,
        }
    }

    fn dma(iova: u64, size: u64) -> DmaMap {
        DmaMap {
            iova: Iova(iova),
            vaddr: 0x7f00_0000_0000 + iova,
            size,
            read: true,
            write: true,
        }
    }

    #[test]
    fn vm_lifecycle() {
        let alloc = shared();
        let (mut c, mock) = nested(&alloc);
        assert_eq!(c.api_version().unwrap(), 0);
        assert!(c.check_extension(VFIO_TYPE1_NESTING_IOMMU).unwrap());
        assert!(!c.check_extension(VFIO_TYPE1_IOMMU).unwrap());
        let info = c.get_info().unwrap();
        assert_eq!(info.iova_pgsizes, 0x4020_1000);
        assert_eq!(info.nesting, Some(NESTING));

        c.map_dma(&dma(0, 0x10_0000)).unwrap();
        c.map_dma(&dma(0x20_0000, 0x1000)).unwrap();
        let p = c.pasid_alloc(1, 100).unwrap();
        assert_eq!(p.raw(), 1);
        c.bind_gpasid(&bind_of(p)).unwrap();
        let inv = CacheInvalidate {
            cache: IOMMU_CACHE_INV_TYPE_IOTLB,
            granularity: InvGranularity::Addr {
                pasid: Some(p),
                archid: None,
                addr: 0x40_0000,
                granule_size: 0x1000,
                nb_granules: 4,
                leaf: true,
            },
        };
        c.cache_invalidate(&inv).unwrap();
        assert_eq!(mock.borrow().invalidations, vec![inv]);
        assert_eq!(mock.borrow().bound.len(), 1);

        // Freeing a bound PASID unbinds it first.
        c.pasid_free(p).unwrap();
        assert!(mock.borrow().bound.is_empty());
        assert_eq!(c.state().pasids, vec![]);

        let q = c.pasid_alloc(1, 100).unwrap();
        c.bind_gpasid(&bind_of(q)).unwrap();
        assert_eq!(lock(&alloc).total_allocated(), 1);
        drop(c);
        assert_eq!(
            *mock.borrow(),
            MockState {
                invalidations: vec![inv],
                ..MockState::default()
            }
        );
        assert_eq!(lock(&alloc).total_allocated(), 0);
    }

    fn dev(bus: u8, dev: u8) -> SourceId {
        SourceId::new(bus, dev, 0).unwrap()
    }

    #[test]
    fn device_attach_rules() {
        let alloc = shared();
        let (mut c, mock) = nested(&alloc);
        c.attach_device(dev(0, 3)).unwrap();
        c.attach_device(dev(0, 4)).unwrap();
        assert_eq!(
            c.attach_device(dev(0, 3)).unwrap_err(),
            HostError::DeviceAttached(dev(0, 3))
        );
        assert_eq!(
            c.attach_device(dev(0, 3)).unwrap_err().errno(),
            -libc::EBUSY
        );
        // The driver's refusal changes nothing.
        assert_eq!(
            c.attach_device(dev(0xff, 1)).unwrap_err().errno(),
            -libc::EBUSY
        );
        assert_eq!(c.devices(), vec![dev(0, 3), dev(0, 4)]);
        assert_eq!(
            c.detach_device(dev(0, 5)).unwrap_err(),
            HostError::DeviceNotAttached(dev(0, 5))
        );
        assert_eq!(
            c.detach_device(dev(0, 5)).unwrap_err().errno(),
            -libc::EINVAL
        );
        // Bindings outlive a device's detach; the device can come back.
        let p = c.pasid_alloc(1, 10).unwrap();
        c.bind_gpasid(&bind_of(p)).unwrap();
        c.detach_device(dev(0, 3)).unwrap();
        assert_eq!(c.devices(), vec![dev(0, 4)]);
        assert_eq!(mock.borrow().bound.len(), 1);
        c.attach_device(dev(0, 3)).unwrap();
        assert_eq!(
            mock.borrow().devices.iter().copied().collect::<Vec<_>>(),
            c.devices()
        );
        drop(c);
        assert!(mock.borrow().devices.is_empty(), "closing detaches devices");
        assert!(mock.borrow().bound.is_empty());
    }

    #[test]
    fn attach_device_defaults_to_enodev() {
        let mut c = Container::new(shared(), 1, Minimal).unwrap();
        assert_eq!(
            c.attach_device(dev(0, 1)).unwrap_err(),
            HostError::NoDriverOp("attach_device")
        );
        assert!(c.devices().is_empty());
        assert_eq!(
            c.detach_device(dev(0, 1)).unwrap_err().errno(),
            -libc::EINVAL
        );
    }

    /// A page request of `pasid` (last of group `grpid` when `last`), as the VT-d driver
    /// reports one.
    fn pr(pasid: Pasid, grpid: u32, last: bool) -> PageRequest {
        PageRequest {
            pasid: Some(pasid),
            grpid,
            read: true,
            write: last,
            exec: false,
            privileged: false,
            addr: 0x40_0000 + (u64::from(grpid) << 12),
            last_page: last,
            needs_pasid: true,
            private_data: None,
        }
    }

    fn resp(pasid: Option<Pasid>, grpid: u32, code: PageResponseCode) -> PageResponse {
        PageResponse { pasid, grpid, code }
    }

    /// A nesting container with device 0:`d`.0 attached and `n` PASIDs allocated.
    fn vm(alloc: &SharedPasidAllocator, d: u8, n: usize) -> (Container<MockIommu>, Vec<Pasid>) {
        let (mut c, _) = nested(alloc);
        c.attach_device(dev(0, d)).unwrap();
        let pasids = (0..n).map(|_| c.pasid_alloc(1, 100).unwrap()).collect();
        (c, pasids)
    }

    /// A request with private data and LPIG clear still needs a response (§7.5.1): it is
    /// reported as ending its group, stays pending, and its response (from the VMM, or
    /// Invalid when its PASID goes) returns the data (`intel_svm_prq_report`,
    /// `intel_svm_page_response`).
    #[test]
    fn requests_with_private_data_are_answered_with_it() {
        let alloc = shared();
        let (mut c, p) = vm(&alloc, 3, 2);
        let mock = c.backend().state.clone();
        let sink = c.fault_sink();
        for (pasid, data) in [(p[0], [0x11, 0x22]), (p[1], [0x33, 0x44])] {
            let desc = vsva_vtd::prq::PageRequestDesc {
                rid: dev(0, 3),
                pasid: Some(pasid),
                exe: false,
                pm: false,
                read: true,
                write: false,
                lpig: false,
                prg_index: 6,
                addr: 0x40_0000,
                private_data: Some(data),
            };
            sink.report(dev(0, 3), PageRequest::from(&desc)).unwrap();
        }
        assert_eq!(c.pending_page_requests().len(), 2);
        c.page_response(&resp(Some(p[0]), 6, PageResponseCode::Success))
            .unwrap();
        c.pasid_free(p[1]).unwrap();
        assert!(c.pending_page_requests().is_empty());
        let m = mock.borrow();
        assert_eq!(
            m.responses.iter().map(|r| r.1.code).collect::<Vec<_>>(),
            vec![PageResponseCode::Success, PageResponseCode::Invalid]
        );
        assert_eq!(
            m.returned_data,
            vec![Some([0x11, 0x22]), Some([0x33, 0x44])]
        );
    }

    #[test]
    fn backend_gets_the_sink_and_reports_through_it() {
        let alloc = shared();
        let (mut c, p) = vm(&alloc, 3, 1);
        let sink = c.backend().sink.clone().expect("the backend has the sink");
        sink.report(dev(0, 3), pr(p[0], 1, false)).unwrap();
        c.fault_sink().report(dev(0, 3), pr(p[0], 1, true)).unwrap();
        let got = c.read_faults();
        assert_eq!(
            got,
            vec![
                FaultEvent {
                    sid: dev(0, 3),
                    request: pr(p[0], 1, false)
                },
                FaultEvent {
                    sid: dev(0, 3),
                    request: pr(p[0], 1, true)
                },
            ]
        );
        assert!(c.read_faults().is_empty(), "reading drains the queue");
        assert_eq!(c.pending_page_requests(), vec![got[1]]);
    }

    #[test]
    fn fault_routing_isolation() {
        let alloc = shared();
        let (mut a, pa) = vm(&alloc, 3, 2);
        let (mut b, pb) = vm(&alloc, 4, 2);
        let (sa, sb) = (a.fault_sink(), b.fault_sink());
        // B's page requests, even misrouted to A, never reach A.
        assert_eq!(
            sa.report(dev(0, 4), pr(pb[0], 1, true)).unwrap_err(),
            HostError::DeviceNotAttached(dev(0, 4))
        );
        let foreign = sa.report(dev(0, 3), pr(pb[0], 1, true)).unwrap_err();
        assert_eq!(foreign.errno(), -libc::EPERM);
        assert!(foreign.to_string().contains("not a PASID"), "{foreign}");
        let unallocated = Pasid::new(0x9_0000).unwrap();
        assert_eq!(
            sa.report(dev(0, 3), pr(unallocated, 1, true))
                .unwrap_err()
                .errno(),
            -libc::EPERM
        );
        let no_pasid = PageRequest {
            pasid: None,
            needs_pasid: false,
            ..pr(pa[0], 1, true)
        };
        assert_eq!(
            sa.report(dev(0, 3), no_pasid).unwrap_err(),
            HostError::UnownedPageRequest {
                sid: dev(0, 3),
                pasid: None
            }
        );
        assert!(a.read_faults().is_empty() && a.pending_page_requests().is_empty());
        // Each VM gets its own.
        sa.report(dev(0, 3), pr(pa[1], 2, true)).unwrap();
        sb.report(dev(0, 4), pr(pb[1], 2, true)).unwrap();
        assert_eq!(
            a.read_faults(),
            vec![FaultEvent {
                sid: dev(0, 3),
                request: pr(pa[1], 2, true)
            }]
        );
        assert_eq!(
            b.read_faults(),
            vec![FaultEvent {
                sid: dev(0, 4),
                request: pr(pb[1], 2, true)
            }]
        );
        // A freed PASID is no longer the container's: its requests are refused.
        a.pasid_free(pa[0]).unwrap();
        assert_eq!(
            sa.report(dev(0, 3), pr(pa[0], 3, true))
                .unwrap_err()
                .errno(),
            -libc::EPERM
        );
    }

    #[test]
    fn page_response_rules() {
        let alloc = shared();
        let (mut a, pa) = vm(&alloc, 3, 2);
        let (b, pb) = vm(&alloc, 4, 1);
        let a_mock = a.backend().state.clone();
        let b_mock = b.backend().state.clone();
        b.fault_sink()
            .report(dev(0, 4), pr(pb[0], 5, true))
            .unwrap();
        a.fault_sink()
            .report(dev(0, 3), pr(pa[0], 5, false))
            .unwrap();
        let ok = PageResponseCode::Success;
        // Another VM's PASID: EPERM, though B has that group pending.
        assert_eq!(
            a.page_response(&resp(Some(pb[0]), 5, ok))
                .unwrap_err()
                .errno(),
            -libc::EPERM
        );
        // No pending group: a request that is not the last of its group opens none.
        assert_eq!(
            a.page_response(&resp(Some(pa[0]), 5, ok)).unwrap_err(),
            HostError::NoPendingGroup {
                grpid: 5,
                pasid: Some(pa[0])
            }
        );
        a.fault_sink()
            .report(dev(0, 3), pr(pa[0], 5, true))
            .unwrap();
        // The PASID must match when the request needs it back.
        assert_eq!(
            a.page_response(&resp(Some(pa[1]), 5, ok))
                .unwrap_err()
                .errno(),
            -libc::EINVAL
        );
        assert_eq!(
            a.page_response(&resp(None, 5, ok)).unwrap_err().errno(),
            -libc::EINVAL
        );
        // Another device's group: EINVAL.
        assert_eq!(
            a.page_response_to(dev(0, 4), &resp(Some(pa[0]), 5, ok))
                .unwrap_err()
                .errno(),
            -libc::EINVAL
        );
        assert!(a_mock.borrow().responses.is_empty());
        // The driver's failure leaves the group pending.
        let fail = resp(Some(pa[0]), 5, PageResponseCode::Failure);
        assert_eq!(a.page_response(&fail).unwrap_err().errno(), -libc::EIO);
        assert_eq!(a.pending_page_requests().len(), 1);
        a.page_response_to(dev(0, 3), &resp(Some(pa[0]), 5, ok))
            .unwrap();
        assert_eq!(
            a_mock.borrow().responses,
            vec![(dev(0, 3), resp(Some(pa[0]), 5, ok))]
        );
        assert!(a.pending_page_requests().is_empty());
        assert_eq!(
            a.page_response(&resp(Some(pa[0]), 5, ok))
                .unwrap_err()
                .errno(),
            -libc::EINVAL,
            "a group is answered once"
        );
        // B's group is untouched by all of it.
        assert_eq!(b.pending_page_requests().len(), 1);
        assert!(b_mock.borrow().responses.is_empty());

        // A request that does not need its PASID back is matched by group index alone, and
        // the PASID is cleared from the response the driver sends.
        let loose = PageRequest {
            needs_pasid: false,
            ..pr(pa[1], 9, true)
        };
        a.fault_sink().report(dev(0, 3), loose).unwrap();
        a.page_response(&resp(Some(pa[0]), 9, PageResponseCode::Invalid))
            .unwrap();
        assert_eq!(
            a_mock.borrow().responses.last(),
            Some(&(dev(0, 3), resp(None, 9, PageResponseCode::Invalid)))
        );
        assert!(a.pending_page_requests().is_empty());

        // Bytes: a malformed response is EINVAL; type1 v2 has no page responses.
        let mut bad = VfioIommuType1PageResponse {
            argsz: 36,
            flags: 0,
            rid: 3,
            response: IommuPageResponse::from(&resp(Some(pa[0]), 1, ok)),
        }
        .to_bytes();
        assert_eq!(
            a.ioctl(VFIO_IOMMU_PAGE_RESPONSE, &mut bad)
                .unwrap_err()
                .errno(),
            -libc::EINVAL
        );
        let mut v2 = Container::new(alloc.clone(), 1, MockIommu::new(false, false)).unwrap();
        v2.set_iommu(IommuModel::Type1v2).unwrap();
        assert_eq!(
            v2.page_response(&resp(None, 1, ok)).unwrap_err(),
            HostError::NotNesting("VFIO_IOMMU_PAGE_RESPONSE")
        );
    }

    #[test]
    fn page_response_defaults_to_enodev() {
        /// A backend that can attach devices but not answer page requests.
        struct NoPri;

        impl IommuBackend for NoPri {
            fn info(&self) -> BackendInfo {
                Minimal.info()
            }
            fn map_dma(&mut self, _: &DmaMap) -> Result<(), HostError> {
                Ok(())
            }
            fn unmap_dma(&mut self, _: Iova, _: u64) {}
            fn bind_gpasid(&mut self, _: &BindGpasid) -> Result<(), HostError> {
                Ok(())
            }
            fn unbind_gpasid(&mut self, _: &BindGpasid) {}
            fn cache_invalidate(&mut self, _: &CacheInvalidate) -> Result<(), HostError> {
                Ok(())
            }
            fn attach_device(&mut self, _: SourceId) -> Result<(), HostError> {
                Ok(())
            }
        }

        let mut c = Container::new(shared(), 2, NoPri).unwrap();
        c.set_iommu(IommuModel::Type1Nesting).unwrap();
        c.attach_device(dev(0, 1)).unwrap();
        let p = c.pasid_alloc(1, 10).unwrap();
        c.fault_sink().report(dev(0, 1), pr(p, 2, true)).unwrap();
        let r = resp(Some(p), 2, PageResponseCode::Success);
        assert_eq!(
            c.page_response(&r).unwrap_err(),
            HostError::NoDriverOp("page_response")
        );
        assert_eq!(c.pending_page_requests().len(), 1);
        // Teardown does not depend on the driver answering.
        c.detach_device(dev(0, 1)).unwrap();
        assert!(c.pending_page_requests().is_empty());
    }

    #[test]
    fn pending_group_tracking() {
        let alloc = shared();
        let (mut c, p) = vm(&alloc, 3, 2);
        c.attach_device(dev(0, 5)).unwrap();
        let mock = c.backend().state.clone();
        let sink = c.fault_sink();
        let ev = |d: u8, r: PageRequest| FaultEvent {
            sid: dev(0, d),
            request: r,
        };
        // Two devices use the same PASID and group index; a third group of the other PASID.
        sink.report(dev(0, 3), pr(p[0], 1, false)).unwrap();
        sink.report(dev(0, 3), pr(p[0], 1, true)).unwrap();
        sink.report(dev(0, 5), pr(p[0], 1, true)).unwrap();
        sink.report(dev(0, 5), pr(p[1], 2, true)).unwrap();
        assert_eq!(
            c.pending_page_requests(),
            vec![
                ev(3, pr(p[0], 1, true)),
                ev(5, pr(p[0], 1, true)),
                ev(5, pr(p[1], 2, true))
            ]
        );
        // Without a device, the oldest matching group is answered; with one, that device's.
        let ok = resp(Some(p[0]), 1, PageResponseCode::Success);
        c.page_response_to(dev(0, 5), &ok).unwrap();
        assert_eq!(
            c.pending_page_requests(),
            vec![ev(3, pr(p[0], 1, true)), ev(5, pr(p[1], 2, true))]
        );
        c.page_response(&ok).unwrap();
        assert_eq!(c.pending_page_requests(), vec![ev(5, pr(p[1], 2, true))]);
        assert_eq!(
            mock.borrow()
                .responses
                .iter()
                .map(|r| r.0)
                .collect::<Vec<_>>(),
            vec![dev(0, 5), dev(0, 3)]
        );
        // Unread requests stay readable after their group is answered.
        assert_eq!(c.read_faults().len(), 4);

        // Freeing a PASID answers its groups (Invalid) and drops its unread requests.
        sink.report(dev(0, 3), pr(p[1], 7, false)).unwrap();
        sink.report(dev(0, 3), pr(p[0], 8, true)).unwrap();
        c.pasid_free(p[1]).unwrap();
        assert_eq!(
            mock.borrow().responses.last(),
            Some(&(dev(0, 5), resp(Some(p[1]), 2, PageResponseCode::Invalid)))
        );
        assert_eq!(c.read_faults(), vec![ev(3, pr(p[0], 8, true))]);
        assert_eq!(c.pending_page_requests(), vec![ev(3, pr(p[0], 8, true))]);

        // Detaching a device answers its groups and drops its unread requests.
        sink.report(dev(0, 5), pr(p[0], 9, true)).unwrap();
        c.detach_device(dev(0, 3)).unwrap();
        assert_eq!(
            mock.borrow().responses.last(),
            Some(&(dev(0, 3), resp(Some(p[0]), 8, PageResponseCode::Invalid)))
        );
        assert_eq!(c.read_faults(), vec![ev(5, pr(p[0], 9, true))]);
        assert_eq!(c.pending_page_requests(), vec![ev(5, pr(p[0], 9, true))]);
        assert_eq!(
            sink.report(dev(0, 3), pr(p[0], 10, true)).unwrap_err(),
            HostError::DeviceNotAttached(dev(0, 3))
        );
    }

    #[test]
    fn unbinding_answers_the_pasids_waiting_groups() {
        let alloc = shared();
        let (mut c, p) = vm(&alloc, 3, 2);
        let mock = c.backend().state.clone();
        let sink = c.fault_sink();
        let ev = |r: PageRequest| FaultEvent {
            sid: dev(0, 3),
            request: r,
        };
        c.bind_gpasid(&bind_of(p[0])).unwrap();
        sink.report(dev(0, 3), pr(p[0], 1, true)).unwrap();
        sink.report(dev(0, 3), pr(p[0], 2, false)).unwrap();
        sink.report(dev(0, 3), pr(p[1], 3, true)).unwrap();
        c.unbind_gpasid(&bind_of(p[0])).unwrap();
        assert_eq!(
            mock.borrow().responses,
            vec![(dev(0, 3), resp(Some(p[0]), 1, PageResponseCode::Invalid))]
        );
        assert_eq!(c.pending_page_requests(), vec![ev(pr(p[1], 3, true))]);
        assert_eq!(c.read_faults(), vec![ev(pr(p[1], 3, true))]);
        // The PASID is still the container's: bound again, its requests are taken.
        c.bind_gpasid(&bind_of(p[0])).unwrap();
        sink.report(dev(0, 3), pr(p[0], 4, true)).unwrap();
        assert_eq!(c.read_faults(), vec![ev(pr(p[0], 4, true))]);
    }

    #[test]
    fn fault_queue_is_bounded() {
        let alloc = shared();
        let (mut c, p) = vm(&alloc, 3, 1);
        let sink = c.fault_sink();
        for g in 0..FAULT_QUEUE_DEPTH as u32 {
            sink.report(dev(0, 3), pr(p[0], g, true)).unwrap();
        }
        let full = sink.report(dev(0, 3), pr(p[0], 0, false)).unwrap_err();
        assert_eq!(full, HostError::FaultQueueFull(FAULT_QUEUE_DEPTH));
        assert_eq!(full.errno(), -libc::ENOSPC);
        // Reading makes room for requests, but every group still waits for its response.
        assert_eq!(c.read_faults().len(), FAULT_QUEUE_DEPTH);
        sink.report(dev(0, 3), pr(p[0], 0, false)).unwrap();
        assert_eq!(
            sink.report(dev(0, 3), pr(p[0], 0, true)).unwrap_err(),
            HostError::FaultQueueFull(FAULT_QUEUE_DEPTH)
        );
        assert_eq!(c.read_faults().len(), 1);
        c.page_response(&resp(Some(p[0]), 3, PageResponseCode::Success))
            .unwrap();
        sink.report(dev(0, 3), pr(p[0], 3, true)).unwrap();
        assert_eq!(c.pending_page_requests().len(), FAULT_QUEUE_DEPTH);
    }

    fn unrecoverable(pasid: Pasid, page: u64) -> UnrecoverableFault {
        UnrecoverableFault {
            reason: UnrecoverableReason::Permission,
            pasid: Some(pasid),
            read: false,
            write: true,
            exec: false,
            privileged: false,
            addr: Some(page << 12),
            fetch_addr: None,
        }
    }

    /// Unrecoverable faults are taken only from the container's devices for its own
    /// PASIDs; their queue is bounded on its own (a flood of them neither grows it nor
    /// crowds out page requests), and what it drops is counted.
    #[test]
    fn unrecoverable_faults_are_routed_and_bounded() {
        let alloc = shared();
        let (mut a, p) = vm(&alloc, 3, 2);
        let (_b, q) = vm(&alloc, 4, 1);
        let sink = a.fault_sink();
        let e = sink
            .report_unrecoverable(dev(0, 4), unrecoverable(p[0], 1))
            .unwrap_err();
        assert_eq!(e, HostError::DeviceNotAttached(dev(0, 4)));
        assert_eq!(e.errno(), -libc::EINVAL);
        let e = sink
            .report_unrecoverable(dev(0, 3), unrecoverable(q[0], 1))
            .unwrap_err();
        assert_eq!(e.errno(), -libc::EPERM, "another VM's PASID");
        let mut none = unrecoverable(p[0], 1);
        none.pasid = None;
        assert_eq!(
            sink.report_unrecoverable(dev(0, 3), none)
                .unwrap_err()
                .errno(),
            -libc::EPERM
        );
        assert!(a.read_unrecoverable_faults().is_empty());

        for page in 0..FAULT_QUEUE_DEPTH as u64 + 10 {
            let r = sink.report_unrecoverable(dev(0, 3), unrecoverable(p[page as usize % 2], page));
            if page < FAULT_QUEUE_DEPTH as u64 {
                r.unwrap();
            } else {
                assert_eq!(r, Err(HostError::FaultQueueFull(FAULT_QUEUE_DEPTH)));
            }
        }
        assert_eq!(a.unrecoverable_faults_lost(), 10);
        // Page requests still have their room.
        sink.report(dev(0, 3), pr(p[0], 1, true)).unwrap();
        assert_eq!(a.read_faults().len(), 1);
        // Freeing a PASID drops its unread faults; the oldest are kept, in order.
        a.pasid_free(p[1]).unwrap();
        let left = a.read_unrecoverable_faults();
        assert_eq!(left.len(), FAULT_QUEUE_DEPTH / 2);
        assert!(left
            .iter()
            .enumerate()
            .all(|(i, e)| e.sid == dev(0, 3) && e.fault == unrecoverable(p[0], 2 * i as u64)));
        sink.report_unrecoverable(dev(0, 3), unrecoverable(p[0], 1))
            .unwrap();
        // Detaching the device drops its faults too.
        a.detach_device(dev(0, 3)).unwrap();
        assert!(a.read_unrecoverable_faults().is_empty());
    }

    #[test]
    fn notifier_signals_each_accepted_request() {
        let alloc = shared();
        let (mut c, p) = vm(&alloc, 3, 1);
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        c.set_fault_notifier(move || {
            seen.fetch_add(1, Ordering::SeqCst);
        });
        let sink = c.fault_sink();
        let other = Pasid::new(0x8_0000).unwrap();
        let thread_sink = sink.clone();
        let p0 = p[0];
        // The driver's page request handler may run on another thread.
        std::thread::spawn(move || {
            thread_sink.report(dev(0, 3), pr(p0, 1, true)).unwrap();
            thread_sink
                .report(dev(0, 3), pr(other, 1, true))
                .unwrap_err();
        })
        .join()
        .unwrap();
        assert_eq!(
            count.load(Ordering::SeqCst),
            1,
            "refused requests do not signal"
        );
        assert_eq!(c.read_faults().len(), 1);
        c.clear_fault_notifier();
        sink.report(dev(0, 3), pr(p[0], 2, true)).unwrap();
        assert_eq!(count.load(Ordering::SeqCst), 1);
        // A notifier may read the queue: it runs without the queue's lock.
        let sink_in_notifier = sink.clone();
        c.set_fault_notifier(move || {
            assert!(format!("{sink_in_notifier:?}").contains("unread"));
        });
        sink.report(dev(0, 3), pr(p[0], 3, true)).unwrap();
    }

    #[test]
    fn closing_drops_pending_faults() {
        let alloc = shared();
        let (c, p) = vm(&alloc, 3, 2);
        let mock = c.backend().state.clone();
        let count = Arc::new(AtomicUsize::new(0));
        let sink = c.fault_sink();
        let mut c = c;
        let seen = count.clone();
        c.set_fault_notifier(move || {
            seen.fetch_add(1, Ordering::SeqCst);
        });
        sink.report(dev(0, 3), pr(p[0], 1, true)).unwrap();
        sink.report(dev(0, 3), pr(p[1], 2, true)).unwrap();
        sink.report(dev(0, 3), pr(p[1], 3, false)).unwrap();
        c.bind_gpasid(&bind_of(p[0])).unwrap();
        drop(c);
        let m = mock.borrow();
        // Every pending group was answered Invalid, before the device was detached.
        assert_eq!(
            m.responses
                .iter()
                .map(|(_, r)| (r.grpid, r.code))
                .collect::<Vec<_>>(),
            vec![
                (1, PageResponseCode::Invalid),
                (2, PageResponseCode::Invalid)
            ]
        );
        assert!(m.devices.is_empty() && m.bound.is_empty());
        // The sink outlives the container but takes nothing any more.
        assert_eq!(
            sink.report(dev(0, 3), pr(p[0], 4, true)).unwrap_err(),
            HostError::DeviceNotAttached(dev(0, 3))
        );
        assert_eq!(count.load(Ordering::SeqCst), 3);
        assert!(format!("{sink:?}").contains("unread: 0"), "{sink:?}");
    }

    #[test]
    fn containers_cannot_touch_each_others_pasids() {
        let alloc = shared();
        let (mut a, _) = nested(&alloc);
        let (mut b, b_mock) = nested(&alloc);
        let pa = a.pasid_alloc(1, 100).unwrap();
        let pb = b.pasid_alloc(1, 100).unwrap();
        assert_ne!(pa, pb);
        a.bind_gpasid(&bind_of(pa)).unwrap();
        let before = (b.state(), b_mock.borrow().clone(), a.state());
        assert_eq!(b.pasid_free(pa).unwrap_err().errno(), -libc::EPERM);
        assert_eq!(
            b.bind_gpasid(&bind_of(pa)).unwrap_err().errno(),
            -libc::EPERM
        );
        assert_eq!(
            b.unbind_gpasid(&bind_of(pa)).unwrap_err().errno(),
            -libc::EPERM
        );
        let inv = CacheInvalidate {
            cache: IOMMU_CACHE_INV_TYPE_PASID,
            granularity: InvGranularity::Pasid {
                pasid: Some(pa),
                archid: None,
            },
        };
        assert_eq!(b.cache_invalidate(&inv).unwrap_err().errno(), -libc::EPERM);
        // A range free skips PASIDs of others.
        b.pasid_free_range(0, 100).unwrap();
        assert_eq!(b.state().pasids, vec![]);
        assert_eq!(before.2, a.state());
        assert_eq!(before.1, *b_mock.borrow());
        assert_eq!(lock(&alloc).owner(pa), Some(a.pasid_set()));
    }

    #[test]
    fn model_gates() {
        let alloc = shared();
        let mut c = Container::new(alloc.clone(), 8, MockIommu::new(false, false)).unwrap();
        assert_eq!(c.get_info().unwrap_err(), HostError::NoIommuModel);
        assert_eq!(c.ioctl(0x3b99, &mut []).unwrap_err().errno(), -libc::EINVAL);
        assert!(!c.check_extension(VFIO_TYPE1_NESTING_IOMMU).unwrap());
        assert_eq!(
            c.set_iommu(IommuModel::Type1Nesting).unwrap_err().errno(),
            -libc::ENODEV
        );
        assert_eq!(
            c.ioctl(VFIO_SET_IOMMU, &mut [3, 0, 0, 0])
                .unwrap_err()
                .errno(),
            -libc::EINVAL
        );
        c.set_iommu(IommuModel::Type1v2).unwrap();
        assert_eq!(
            c.set_iommu(IommuModel::Type1v2).unwrap_err(),
            HostError::IommuModelSet
        );
        assert_eq!(c.get_info().unwrap().nesting, None);
        assert_eq!(
            c.pasid_alloc(1, 10).unwrap_err(),
            HostError::NotNesting("VFIO_IOMMU_PASID_REQUEST")
        );
        assert_eq!(
            c.detach_pasid_table().unwrap_err().errno(),
            -libc::EOPNOTSUPP
        );
        assert_eq!(c.ioctl(0x3b99, &mut []).unwrap_err().errno(), -libc::ENOTTY);
        c.map_dma(&dma(0, 0x1000)).unwrap();
    }

    #[test]
    fn get_info_follows_argsz() {
        let alloc = shared();
        let (mut c, _) = nested(&alloc);
        // argsz too small for the capability: argsz is raised, nothing else follows.
        let mut buf = [0xaau8; 24];
        buf[..4].copy_from_slice(&24u32.to_le_bytes());
        c.ioctl(VFIO_IOMMU_GET_INFO, &mut buf).unwrap();
        let out: VfioIommuType1Info = vsva_uapi::wire::read_prefix(&buf, 24);
        assert_eq!(out.argsz, 96);
        assert_eq!(out.flags, VFIO_IOMMU_INFO_PGSIZES | VFIO_IOMMU_INFO_CAPS);
        assert_eq!(out.cap_offset, 0);
        assert_eq!(&buf[20..], &[0xaa; 4], "padding past cap_offset untouched");
        // argsz 16 (an old header): only 16 bytes are written.
        let mut old = [0xaau8; 24];
        old[..4].copy_from_slice(&16u32.to_le_bytes());
        c.ioctl(VFIO_IOMMU_GET_INFO, &mut old).unwrap();
        assert_eq!(&old[16..], &[0xaa; 8]);
        assert_eq!(
            u64::from_le_bytes(old[8..16].try_into().unwrap()),
            0x4020_1000
        );
        // argsz large enough but the buffer is not: EFAULT, nothing written.
        let mut lying = [0u8; 40];
        lying[..4].copy_from_slice(&96u32.to_le_bytes());
        let before = lying;
        assert_eq!(
            c.ioctl(VFIO_IOMMU_GET_INFO, &mut lying)
                .unwrap_err()
                .errno(),
            -libc::EFAULT
        );
        assert_eq!(lying, before);
        // A full buffer gets the capability at offset 24.
        let mut full = [0u8; 96];
        full[..4].copy_from_slice(&96u32.to_le_bytes());
        c.ioctl(VFIO_IOMMU_GET_INFO, &mut full).unwrap();
        let cap = VfioIommuType1InfoCapNesting::from_bytes(&full[24..]).unwrap();
        assert_eq!(cap.header.next, 0);
        assert_eq!(NestingInfo::try_from(&cap.info).unwrap(), NESTING);
    }

    #[test]
    fn dma_rules() {
        let alloc = shared();
        let (mut c, mock) = nested(&alloc);
        c.map_dma(&dma(0x10_0000, 0x10_0000)).unwrap();
        assert_eq!(
            c.map_dma(&dma(0x1f_f000, 0x2000)).unwrap_err().errno(),
            -libc::EEXIST
        );
        assert_eq!(
            c.map_dma(&dma(0x0f_f000, 0x2000)).unwrap_err().errno(),
            -libc::EEXIST
        );
        let mut unbacked = dma(0x40_0000, 0x1000);
        unbacked.vaddr |= 1 << 47;
        assert_eq!(c.map_dma(&unbacked).unwrap_err().errno(), -libc::EFAULT);
        c.map_dma(&dma(0x20_0000, 0x1000)).unwrap();
        // Splitting a mapping at either end is refused.
        assert_eq!(
            c.unmap_dma(Iova(0x18_0000), 0x10_0000).unwrap_err().errno(),
            -libc::EINVAL
        );
        assert_eq!(
            c.unmap_dma(Iova(0x10_0000), 0x1000).unwrap_err().errno(),
            -libc::EINVAL
        );
        // An empty range unmaps nothing; a covering range unmaps both.
        assert_eq!(c.unmap_dma(Iova(0x80_0000), 0x1000).unwrap(), 0);
        assert_eq!(c.unmap_dma(Iova(0), 0x100_0000).unwrap(), 0x10_1000);
        assert!(mock.borrow().mapped.is_empty());
    }

    #[test]
    fn bind_rules() {
        let alloc = shared();
        let (mut c, mock) = nested(&alloc);
        let p = c.pasid_alloc(1, 10).unwrap();
        let mut bad = bind_of(p);
        bad.addr_width = 39;
        assert_eq!(c.bind_gpasid(&bad).unwrap_err().errno(), -libc::EINVAL);
        assert!(c.state().bound.is_empty());
        c.bind_gpasid(&bind_of(p)).unwrap();
        assert_eq!(
            c.bind_gpasid(&bind_of(p)).unwrap_err().errno(),
            -libc::EBUSY
        );
        c.unbind_gpasid(&bind_of(p)).unwrap();
        assert_eq!(
            c.unbind_gpasid(&bind_of(p)).unwrap_err().errno(),
            -libc::EINVAL
        );
        assert!(mock.borrow().bound.is_empty());
        // The seed refuses other bind types with EINVAL.
        let mut process = VfioBindGuestPasid {
            header: VfioIommuType1Bind {
                argsz: 80,
                bind_type: VFIO_IOMMU_BIND_PROCESS,
            },
            data: IommuGpasidBindData::from(&bind_of(p)),
        }
        .to_bytes();
        assert_eq!(
            c.ioctl(VFIO_IOMMU_BIND, &mut process).unwrap_err(),
            HostError::Uapi(UapiError::UnsupportedBindType(VFIO_IOMMU_BIND_PROCESS))
        );
        // Quota: 8 PASIDs per container here.
        for _ in 0..7 {
            c.pasid_alloc(1, 100).unwrap();
        }
        assert_eq!(c.pasid_alloc(1, 100).unwrap_err().errno(), -libc::ENOSPC);
    }

    #[test]
    fn pasid_table_rules() {
        let cfg = PasidTableConfig {
            base_ptr: Gpa(0x8_0000),
            pasid_bits: 16,
            config: PasidConfig::Translate { s1fmt: 1, s1dss: 0 },
        };
        let alloc = shared();
        let (mut vtd, _) = nested(&alloc);
        assert_eq!(
            vtd.attach_pasid_table(&cfg).unwrap_err(),
            HostError::NoDriverOp("attach_pasid_table")
        );
        assert_eq!(
            vtd.attach_pasid_table(&cfg).unwrap_err().errno(),
            -libc::ENODEV
        );

        let backend = MockIommu::new(true, true);
        let mock = backend.state.clone();
        let mut smmu = Container::new(alloc.clone(), 8, backend).unwrap();
        smmu.set_iommu(IommuModel::Type1Nesting).unwrap();
        let p = smmu.pasid_alloc(1, 10).unwrap();
        smmu.bind_gpasid(&bind_of(p)).unwrap();
        assert_eq!(
            smmu.attach_pasid_table(&cfg).unwrap_err().errno(),
            -libc::EBUSY
        );
        smmu.unbind_gpasid(&bind_of(p)).unwrap();
        smmu.attach_pasid_table(&cfg).unwrap();
        assert_eq!(mock.borrow().table, Some(cfg));
        assert_eq!(
            smmu.bind_gpasid(&bind_of(p)).unwrap_err().errno(),
            -libc::EBUSY
        );
        smmu.detach_pasid_table().unwrap();
        smmu.detach_pasid_table().unwrap();
        assert_eq!(mock.borrow().table, None);
        smmu.attach_pasid_table(&cfg).unwrap();
        drop(smmu);
        assert_eq!(mock.borrow().table, None, "closing detaches the table");
    }

    /// A backend that implements only what is required.
    struct Minimal;

    impl IommuBackend for Minimal {
        fn info(&self) -> BackendInfo {
            BackendInfo {
                iova_pgsizes: 0x1000,
                nesting: Some(NESTING),
            }
        }
        fn map_dma(&mut self, _: &DmaMap) -> Result<(), HostError> {
            Ok(())
        }
        fn unmap_dma(&mut self, _: Iova, _: u64) {}
        fn bind_gpasid(&mut self, _: &BindGpasid) -> Result<(), HostError> {
            Ok(())
        }
        fn unbind_gpasid(&mut self, _: &BindGpasid) {}
        fn cache_invalidate(&mut self, _: &CacheInvalidate) -> Result<(), HostError> {
            Ok(())
        }
    }

    #[test]
    fn attach_pasid_table_defaults_to_enodev() {
        let cfg = PasidTableConfig {
            base_ptr: Gpa(0),
            pasid_bits: 0,
            config: PasidConfig::Abort,
        };
        let mut c = Container::new(shared(), 1, Minimal).unwrap();
        c.set_iommu(IommuModel::Type1Nesting).unwrap();
        assert_eq!(
            c.attach_pasid_table(&cfg).unwrap_err().errno(),
            -libc::ENODEV
        );
        assert_eq!(c.state().pasid_table, None);
    }

    // ----- The dispatch table and the container as a file -----

    #[test]
    fn dispatch_table_has_one_row_per_ioctl() {
        let mut cmds = cmds();
        let n = cmds.len();
        cmds.sort_unstable();
        cmds.dedup();
        assert_eq!(cmds.len(), n, "an ioctl number appears twice in the table");
        for cmd in [
            0,
            VFIO_BASE,
            io(VFIO_TYPE, VFIO_BASE + 3),
            io(VFIO_TYPE, VFIO_BASE + 65),
        ] {
            assert!(!cmds.contains(&cmd));
            let mut c = Container::new(shared(), 1, Minimal).unwrap();
            c.set_iommu(IommuModel::Type1Nesting).unwrap();
            assert_eq!(
                c.ioctl(cmd, &mut [0; 64]).unwrap_err(),
                HostError::UnknownIoctl(cmd)
            );
        }
    }

    #[test]
    fn dispatch_table_refuses_short_arguments_with_efault() {
        // copy_from_user of the ioctl's minsz faults on a shorter buffer: -EFAULT, and the
        // container is unchanged; one byte more reaches the handler (which then refuses
        // the zero argsz with -EINVAL).
        let (mut c, _) = nested(&shared());
        let before = c.state();
        for op in Container::<MockIommu>::IOCTLS
            .iter()
            .filter(|op| op.min_size > 0)
        {
            let mut short = vec![0u8; op.min_size - 1];
            let e = c.ioctl(op.cmd, &mut short).unwrap_err();
            assert_eq!(e.errno(), -libc::EFAULT, "{} {e}", op.name);
            let mut zero = vec![0u8; op.min_size];
            assert_eq!(
                c.ioctl(op.cmd, &mut zero).unwrap_err().errno(),
                -libc::EINVAL,
                "{}",
                op.name
            );
        }
        assert_eq!(c.state(), before);
        // Before VFIO_SET_IOMMU, a short argument still gets the model's -EINVAL first.
        let mut fresh = Container::new(shared(), 1, Minimal).unwrap();
        assert_eq!(
            fresh.ioctl(VFIO_IOMMU_MAP_DMA, &mut []).unwrap_err(),
            HostError::NoIommuModel
        );
    }

    #[test]
    fn detach_pasid_table_has_its_own_arm() {
        let mut c = Container::new(shared(), 1, Minimal).unwrap();
        assert_eq!(c.detach_pasid_table().unwrap_err(), HostError::NoIommuModel);
        c.set_iommu(IommuModel::Type1v2).unwrap();
        assert_eq!(
            c.detach_pasid_table().unwrap_err(),
            HostError::NotNesting("VFIO_IOMMU_DETACH_PASID_TABLE")
        );
        let backend = MockIommu::new(true, true);
        let state = backend.state.clone();
        let mut n = Container::new(shared(), 8, backend).unwrap();
        n.set_iommu(IommuModel::Type1Nesting).unwrap();
        // Nothing attached: nothing to undo.
        n.detach_pasid_table().unwrap();
        let cfg = PasidTableConfig {
            base_ptr: Gpa(0x9000),
            pasid_bits: 10,
            config: PasidConfig::Bypass,
        };
        n.attach_pasid_table(&cfg).unwrap();
        assert_eq!(state.borrow().table, Some(cfg));
        n.detach_pasid_table().unwrap();
        assert_eq!(state.borrow().table, None);
        assert_eq!(n.state().pasid_table, None);
    }

    /// A `Send` backend that attaches devices and answers page requests.
    struct Answering;

    impl IommuBackend for Answering {
        fn info(&self) -> BackendInfo {
            Minimal.info()
        }
        fn map_dma(&mut self, _: &DmaMap) -> Result<(), HostError> {
            Ok(())
        }
        fn unmap_dma(&mut self, _: Iova, _: u64) {}
        fn bind_gpasid(&mut self, _: &BindGpasid) -> Result<(), HostError> {
            Ok(())
        }
        fn unbind_gpasid(&mut self, _: &BindGpasid) {}
        fn cache_invalidate(&mut self, _: &CacheInvalidate) -> Result<(), HostError> {
            Ok(())
        }
        fn attach_device(&mut self, _: SourceId) -> Result<(), HostError> {
            Ok(())
        }
        fn page_response(
            &mut self,
            _: SourceId,
            _: &PageRequest,
            _: &PageResponse,
        ) -> Result<(), HostError> {
            Ok(())
        }
    }

    #[test]
    fn typed_wrappers_round_trip_through_the_file() {
        use crate::file::ContainerFile;
        use vsva_uapi::{error::Errno, file::Type1Info, file::UapiFile};

        let file: Arc<dyn UapiFile> = Arc::new(ContainerFile::new(
            Container::new(shared(), 4, Answering).unwrap(),
        ));
        let mut fd: &dyn UapiFile = &*file;
        assert_eq!(fd.api_version(), Ok(VFIO_API_VERSION));
        assert_eq!(fd.check_extension(VFIO_TYPE1_NESTING_IOMMU), Ok(true));
        assert_eq!(fd.pasid_alloc(1, 10), Err(Errno::EINVAL), "no model yet");
        fd.set_iommu(IommuModel::Type1Nesting).unwrap();
        assert_eq!(
            fd.get_info().unwrap(),
            Type1Info {
                iova_pgsizes: 0x1000,
                nesting: Some(NESTING)
            }
        );
        let m = dma(0x10000, 0x3000);
        fd.map_dma(&m).unwrap();
        assert_eq!(fd.map_dma(&m), Err(Errno::EEXIST));
        assert_eq!(fd.unmap_dma(Iova(0x10000), 0x3000), Ok(0x3000));
        let p = fd.pasid_alloc(1, 10).unwrap();
        assert_eq!(p.raw(), 1);
        fd.bind_gpasid(&bind_of(p)).unwrap();
        assert_eq!(fd.bind_gpasid(&bind_of(p)), Err(Errno::EBUSY));
        assert_eq!(fd.ioctl(0x3bff, &mut []), Err(Errno::ENOTTY));
        assert_eq!(
            fd.ioctl(VFIO_IOMMU_MAP_DMA, &mut [0; 31]),
            Err(Errno::EFAULT)
        );
        fd.detach_pasid_table().unwrap();

        // The fault queue is read as records and answered by a write.
        let mut buf = [0u8; 200];
        assert_eq!(file.read(&mut buf), Err(Errno::EAGAIN));
        assert_eq!(file.read(&mut buf[..71]), Err(Errno::EINVAL));
        let notified = Arc::new(AtomicUsize::new(0));
        let typed = Arc::new(ContainerFile::new(
            Container::new(shared(), 4, Answering).unwrap(),
        ));
        let file2: Arc<dyn UapiFile> = typed.clone();
        let mut fd2: &dyn UapiFile = &*file2;
        fd2.set_iommu(IommuModel::Type1Nesting).unwrap();
        typed.lock().attach_device(dev(0, 1)).unwrap();
        let q = fd2.pasid_alloc(1, 10).unwrap();
        file2.set_event_notifier(Some(Arc::new({
            let n = Arc::clone(&notified);
            move || {
                n.fetch_add(1, Ordering::SeqCst);
            }
        })));
        let sink = typed.lock().fault_sink();
        let fault = UnrecoverableFault {
            reason: UnrecoverableReason::PteFetch,
            pasid: Some(q),
            read: true,
            write: false,
            exec: false,
            privileged: false,
            addr: Some(0x4000),
            fetch_addr: None,
        };
        sink.report(dev(0, 1), pr(q, 2, false)).unwrap();
        sink.report_unrecoverable(dev(0, 1), fault).unwrap();
        sink.report(dev(0, 1), pr(q, 3, true)).unwrap();
        assert_eq!(notified.load(Ordering::SeqCst), 3);
        // Records come back in the order they were reported, whatever their kind.
        let events = file2.read_faults().unwrap();
        assert_eq!(
            events,
            vec![
                QueuedFault::PageRequest(FaultEvent {
                    sid: dev(0, 1),
                    request: pr(q, 2, false)
                }),
                QueuedFault::Unrecoverable(UnrecoverableEvent {
                    sid: dev(0, 1),
                    fault
                }),
                QueuedFault::PageRequest(FaultEvent {
                    sid: dev(0, 1),
                    request: pr(q, 3, true)
                }),
            ]
        );
        assert_eq!(file2.read(&mut buf), Err(Errno::EAGAIN));
        let answer = vsva_uapi::file::page_response_bytes(
            Some(dev(0, 1)),
            &resp(Some(q), 3, PageResponseCode::Success),
        );
        assert_eq!(file2.write(&answer), Ok(answer.len()));
        assert!(typed.lock().pending_page_requests().is_empty());
        assert_eq!(file2.write(&answer), Err(Errno::EINVAL), "answered already");
        file2.set_event_notifier(None);
        sink.report(dev(0, 1), pr(q, 4, true)).unwrap();
        assert_eq!(notified.load(Ordering::SeqCst), 3);
    }

    // ----- Property test over arbitrary ioctls -----

    /// Every container ioctl, from the dispatch table.
    fn cmds() -> Vec<u32> {
        Container::<Minimal>::IOCTLS
            .iter()
            .map(|op| op.cmd)
            .collect()
    }

    /// A mostly well-formed argument for `cmd`, with small values so that requests collide.
    fn template(cmd: u32) -> BoxedStrategy<Vec<u8>> {
        match cmd {
            VFIO_CHECK_EXTENSION | VFIO_SET_IOMMU => prop_oneof![
                4 => prop_oneof![Just(3u64), Just(6u64)],
                1 => 0u64..10,
            ]
            .prop_map(|v| v.to_le_bytes().to_vec())
            .boxed(),
            VFIO_IOMMU_GET_INFO => (
                prop_oneof![Just(0u32), Just(16), Just(20), Just(24), Just(96), Just(200)],
                0usize..120,
            )
                .prop_map(|(argsz, len)| {
                    let mut v = vec![0u8; len];
                    let n = len.min(4);
                    v[..n].copy_from_slice(&argsz.to_le_bytes()[..n]);
                    v
                })
                .boxed(),
            VFIO_IOMMU_MAP_DMA => (0u32..4, 0u64..32, 0u64..6, any::<bool>())
                .prop_map(|(flags, page, pages, unbacked)| {
                    VfioIommuType1DmaMap {
                        argsz: 32,
                        flags,
                        vaddr: (page << 12) | if unbacked { 1 << 47 } else { 0 },
                        iova: page << 12,
                        size: pages << 12,
                    }
                    .to_bytes()
                    .to_vec()
                })
                .boxed(),
            VFIO_IOMMU_UNMAP_DMA => (0u64..32, 0u64..12)
                .prop_map(|(page, pages)| {
                    VfioIommuType1DmaUnmap {
                        argsz: 24,
                        flags: 0,
                        iova: page << 12,
                        size: pages << 12,
                        ..Default::default()
                    }
                    .to_bytes()
                    .to_vec()
                })
                .boxed(),
            VFIO_IOMMU_PASID_REQUEST => (
                prop_oneof![3 => Just(VFIO_IOMMU_FLAG_ALLOC_PASID), 2 => Just(VFIO_IOMMU_FLAG_FREE_PASID), 1 => 0u32..4],
                0u32..10,
                0u32..20,
            )
                .prop_map(|(flags, min, span)| {
                    let max = min + span;
                    VfioIommuType1PasidRequest {
                        argsz: 16,
                        flags,
                        range: VfioPasidRange { min, max },
                    }
                    .to_bytes()
                    .to_vec()
                })
                .boxed(),
            VFIO_IOMMU_BIND | VFIO_IOMMU_UNBIND => (
                prop_oneof![5 => Just(VFIO_IOMMU_BIND_GUEST_PASID), 1 => 0u32..3],
                // Mostly the PASIDs the container was given (5..=7), sometimes another VM's.
                prop_oneof![3 => 5u64..8, 1 => 0u64..12],
                prop_oneof![Just(48u32), Just(57), Just(39)],
                0u64..2,
            )
                .prop_map(|(bind_type, hpasid, addr_width, flags)| {
                    VfioBindGuestPasid {
                        header: VfioIommuType1Bind {
                            argsz: 80,
                            bind_type,
                        },
                        data: IommuGpasidBindData {
                            argsz: 72,
                            version: 1,
                            format: IOMMU_PASID_FORMAT_INTEL_VTD,
                            addr_width,
                            flags,
                            gpgd: 0x5000,
                            hpasid,
                            gpasid: hpasid,
                            padding: [0; 8],
                            vendor: IommuGpasidBindVendor::default(),
                        },
                    }
                    .to_bytes()
                    .to_vec()
                })
                .boxed(),
            VFIO_IOMMU_CACHE_INVALIDATE => (
                0u8..4,
                prop_oneof![Just(1u8), Just(3), Just(7), 0u8..8],
                0u64..14,
                prop_oneof![Just(1u32), 0u32..8],
                0u64..4,
            )
                .prop_map(|(granularity, cache, pasid, flags, n)| {
                    VfioIommuType1CacheInvalidate {
                        argsz: 64,
                        flags: 0,
                        info: IommuCacheInvalidateInfo {
                            argsz: 56,
                            version: 1,
                            cache,
                            granularity,
                            padding: [0; 6],
                            granu: IommuInvAddrInfo {
                                flags,
                                archid: 0,
                                pasid,
                                addr: 0x10_0000,
                                granule_size: 0x1000,
                                nb_granules: n,
                            },
                        },
                    }
                    .to_bytes()
                    .to_vec()
                })
                .boxed(),
            VFIO_IOMMU_ATTACH_PASID_TABLE => (0u8..4, 0u8..22)
                .prop_map(|(config, pasid_bits)| {
                    let mut cfg = IommuPasidTableConfig::from(&PasidTableConfig {
                        base_ptr: Gpa(0x4000),
                        pasid_bits,
                        config: PasidConfig::Translate { s1fmt: 0, s1dss: 0 },
                    });
                    cfg.config = config;
                    VfioIommuType1AttachPasidTable {
                        argsz: 40,
                        flags: 0,
                        config: cfg,
                    }
                    .to_bytes()
                    .to_vec()
                })
                .boxed(),
            VFIO_IOMMU_PAGE_RESPONSE => (
                proptest::option::weighted(0.3, prop_oneof![Just(0x10u32), 0u32..0x20]),
                // Mostly the container's PASIDs (5..=7) and the groups reported (0..=3).
                proptest::option::weighted(0.9, prop_oneof![3 => 5u32..8, 1 => 0u32..12]),
                0u32..5,
                prop_oneof![4 => 0u32..2, 1 => 0u32..4],
            )
                .prop_map(|(rid, pasid, grpid, code)| {
                    VfioIommuType1PageResponse {
                        argsz: 36,
                        flags: rid.map_or(0, |_| VFIO_IOMMU_PAGE_RESPONSE_RID_VALID),
                        rid: rid.unwrap_or(0),
                        response: IommuPageResponse {
                            argsz: 24,
                            version: IOMMU_PAGE_RESP_VERSION_1,
                            flags: pasid.map_or(0, |_| IOMMU_PAGE_RESP_PASID_VALID),
                            pasid: pasid.unwrap_or(0),
                            grpid,
                            code,
                        },
                    }
                    .to_bytes()
                    .to_vec()
                })
                .boxed(),
            _ => proptest::collection::vec(any::<u8>(), 0..96).boxed(),
        }
    }

    /// An ioctl: a known or random command with a template argument, possibly corrupted
    /// (one byte overwritten) or cut short.
    fn ioctl_call() -> impl Strategy<Value = (u32, Vec<u8>)> {
        // The SVA ioctls that change state come up three times as often as the others.
        let weighted: Vec<u32> = cmds()
            .iter()
            .flat_map(|&c| {
                let n = match c {
                    VFIO_IOMMU_BIND | VFIO_IOMMU_UNBIND | VFIO_IOMMU_PASID_REQUEST => 3,
                    _ => 1,
                };
                std::iter::repeat_n(c, n)
            })
            .collect();
        prop_oneof![
            12 => proptest::sample::select(weighted),
            1 => any::<u32>(),
        ]
        .prop_flat_map(|cmd| {
            (
                Just(cmd),
                template(cmd),
                proptest::option::weighted(0.2, (any::<usize>(), any::<u8>())),
                proptest::option::weighted(0.1, any::<usize>()),
            )
        })
        .prop_map(|(cmd, mut bytes, corrupt, cut)| {
            if let (Some((at, value)), false) = (corrupt, bytes.is_empty()) {
                let i = at % bytes.len();
                bytes[i] = value;
            }
            if let Some(len) = cut {
                bytes.truncate(len % (bytes.len() + 1));
            }
            (cmd, bytes)
        })
    }

    /// One step of a driver that may route page requests to the wrong container.
    #[derive(Clone, Debug)]
    enum FaultOp {
        /// Report to A's sink (else B's) a request from device 0:`dev`.0 for PASID `pasid`
        /// of the pool (A's two, B's two, an unallocated one, none).
        Report {
            to_a: bool,
            dev: u8,
            pasid: usize,
            grpid: u32,
            last: bool,
        },
        /// Read A's queue (else B's).
        Read(bool),
        /// Free A's PASID of the pool.
        FreeA(usize),
        /// Detach A's device, or attach it back.
        ToggleA,
    }

    fn fault_op() -> impl Strategy<Value = FaultOp> {
        prop_oneof![
            6 => (any::<bool>(), 3u8..6, 0usize..6, 0u32..4, any::<bool>()).prop_map(
                |(to_a, dev, pasid, grpid, last)| FaultOp::Report { to_a, dev, pasid, grpid, last }
            ),
            2 => any::<bool>().prop_map(FaultOp::Read),
            1 => (0usize..2).prop_map(FaultOp::FreeA),
            1 => Just(FaultOp::ToggleA),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Whatever the driver reports to which sink, a container's queue takes exactly the
        /// requests of its attached devices for PASIDs of its set, drops them when the PASID
        /// or the device goes, and reads them back in order: VM A never sees VM B's requests.
        #[test]
        fn fault_routing_isolation_under_misrouting(
            ops in proptest::collection::vec(fault_op(), 1..80),
        ) {
            let alloc = shared();
            let (mut a, pa) = vm(&alloc, 3, 2);
            let (mut b, pb) = vm(&alloc, 4, 2);
            let pool = [
                Some(pa[0]),
                Some(pa[1]),
                Some(pb[0]),
                Some(pb[1]),
                Some(Pasid::new(0x7_7777).unwrap()),
                None,
            ];
            let (sa, sb) = (a.fault_sink(), b.fault_sink());
            let mut a_pasids: BTreeSet<Pasid> = pa.iter().copied().collect();
            let mut a_attached = true;
            let (mut want_a, mut want_b) = (Vec::new(), Vec::new());
            for op in ops {
                match op {
                    FaultOp::Report { to_a, dev: d, pasid, grpid, last } => {
                        let request = PageRequest { pasid: pool[pasid], ..pr(pa[0], grpid, last) };
                        let sid = dev(0, d);
                        let (sink, accepts, want) = if to_a {
                            let ok = a_attached && d == 3 && pool[pasid].is_some_and(|p| a_pasids.contains(&p));
                            (&sa, ok, &mut want_a)
                        } else {
                            let ok = d == 4 && pool[pasid].is_some_and(|p| pb.contains(&p));
                            (&sb, ok, &mut want_b)
                        };
                        let got = sink.report(sid, request);
                        prop_assert_eq!(got.is_ok(), accepts, "{:?}", got);
                        if accepts {
                            want.push(FaultEvent { sid, request });
                        }
                    }
                    FaultOp::Read(true) => {
                        prop_assert_eq!(a.read_faults(), std::mem::take(&mut want_a));
                    }
                    FaultOp::Read(false) => {
                        prop_assert_eq!(b.read_faults(), std::mem::take(&mut want_b));
                    }
                    FaultOp::FreeA(i) => {
                        if a_pasids.remove(&pa[i]) {
                            a.pasid_free(pa[i]).unwrap();
                            want_a.retain(|e| e.request.pasid != Some(pa[i]));
                        }
                    }
                    FaultOp::ToggleA => {
                        if a_attached {
                            a.detach_device(dev(0, 3)).unwrap();
                            want_a.clear();
                        } else {
                            a.attach_device(dev(0, 3)).unwrap();
                        }
                        a_attached = !a_attached;
                    }
                }
                for e in a.pending_page_requests() {
                    prop_assert_eq!(e.sid, dev(0, 3));
                    prop_assert_eq!(lock(&alloc).owner(e.request.pasid.unwrap()), Some(a.pasid_set()));
                }
                for e in b.pending_page_requests() {
                    prop_assert_eq!(e.sid, dev(0, 4));
                    prop_assert!(pb.contains(&e.request.pasid.unwrap()));
                }
            }
            prop_assert_eq!(a.read_faults(), want_a);
            prop_assert_eq!(b.read_faults(), want_b);
        }

        /// Arbitrary ioctl sequences never panic; a failed ioctl changes nothing (container,
        /// backend, allocator, another VM's container, argument bytes); after each ioctl the
        /// container and the backend agree and every bound PASID is the container's own;
        /// closing the container releases everything, and every page request group reported
        /// has been answered exactly once.
        #[test]
        fn arbitrary_ioctls(
            nesting in proptest::bool::weighted(0.85),
            smmu in proptest::bool::weighted(0.3),
            set_first in proptest::bool::weighted(0.9),
            calls in proptest::collection::vec(ioctl_call(), 1..60),
        ) {
            let alloc = shared();
            let (mut other, _) = nested(&alloc);
            for _ in 0..4 {
                other.pasid_alloc(1, 30).unwrap();
            }
            let backend = MockIommu::new(nesting, smmu);
            let mock = backend.state.clone();
            let mut c = Container::new(alloc.clone(), 6, backend).unwrap();
            let device = SourceId::new(0, 2, 0).unwrap();
            c.attach_device(device).unwrap();
            let mut groups = Vec::new();
            if set_first {
                let model = if nesting { IommuModel::Type1Nesting } else { IommuModel::Type1v2 };
                c.set_iommu(model).unwrap();
                if nesting {
                    for _ in 0..3 {
                        let p = c.pasid_alloc(1, 30).unwrap();
                        for grpid in 0..4 {
                            c.fault_sink().report(device, pr(p, grpid, false)).unwrap();
                            c.fault_sink().report(device, pr(p, grpid, true)).unwrap();
                            groups.push((grpid, p));
                        }
                    }
                }
            }
            for (cmd, mut arg) in calls {
                let faults = |c: &Container<MockIommu>| c.pending_page_requests();
                let before =
                    (c.state(), mock.borrow().clone(), other.state(), arg.clone(), faults(&c));
                match c.ioctl(cmd, &mut arg) {
                    Err(e) => {
                        prop_assert!(e.errno() < 0);
                        prop_assert!(!e.to_string().is_empty());
                        let after =
                            (c.state(), mock.borrow().clone(), other.state(), arg.clone(), faults(&c));
                        prop_assert_eq!(before, after, "failed {:#x}: {}", cmd, e);
                    }
                    Ok(_) => {
                        let s = c.state();
                        let m = mock.borrow();
                        prop_assert_eq!(&s.dma, &m.mapped.values().copied().collect::<Vec<_>>());
                        prop_assert_eq!(&s.bound, &m.bound.values().copied().collect::<Vec<_>>());
                        prop_assert_eq!(s.pasid_table, m.table);
                        for b in &s.bound {
                            prop_assert!(s.pasids.contains(&b.hpasid));
                        }
                        prop_assert!(s.pasids.len() <= 6);
                        prop_assert_eq!(&before.2, &other.state());
                        for e in faults(&c) {
                            prop_assert!(s.pasids.contains(&e.request.pasid.unwrap()));
                        }
                    }
                }
            }
            let other_pasids = other.state().pasids;
            drop(c);
            let m = mock.borrow();
            prop_assert!(m.mapped.is_empty() && m.bound.is_empty() && m.table.is_none());
            prop_assert!(m.devices.is_empty());
            let mut answered: Vec<(u32, Pasid)> = m
                .responses
                .iter()
                .map(|(sid, r)| {
                    assert_eq!(*sid, device);
                    (r.grpid, r.pasid.unwrap())
                })
                .collect();
            answered.sort();
            groups.sort();
            prop_assert_eq!(answered, groups);
            prop_assert_eq!(lock(&alloc).total_allocated(), other_pasids.len());
        }
    }
}
