//! The iommufd file kind: a connection that opens `/dev/iommu` on the host VT-d driver or
//! on the host SMMUv3 driver.
//!
//! Every ioctl the kind serves is in its table ([`IOCTLS`] on VT-d, [`SMMU_IOCTLS`] on
//! SMMUv3), with the user pointer its argument
//! carries, if any, and how the bytes it names are counted from the argument's own
//! fields, so that the server translates exactly the range the file will touch (as the
//! kernel's `copy_from_user`/`copy_to_user` of that range would fault outside the
//! caller's memory). An ioctl that is not in the table never reaches the file (ENOTTY):
//! one whose pointer is not described cannot pass untranslated. The table also names the
//! field where an ioctl gives a file descriptor: `FAULT_QUEUE_ALLOC`'s fault queue and
//! `VEVENTQ_ALLOC`'s vEVENT queue reach the client as one end of a socket pair the host
//! serves ([`crate::fault`]), sent with the reply. It names the field of a memory file
//! too: `IOAS_MAP_FILE` takes the memfd with the request and the host file maps the file's
//! own pages in place, through the connection (`vsva_host::iommufd::map_file`, the same
//! code as in process). The cdev's `BIND_IOMMUFD` is not served; `DEVICE_ADD`
//! binds the
//! connection's device instead.

use std::mem::{offset_of, size_of};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, PoisonError};

use vsva_host::driver::{DirtyBitmap, HostIommu};
use vsva_host::iommufd::device::{Iommufds, VfioDeviceFile};
use vsva_host::iommufd::map_file::MemoryFiles;
use vsva_host::iommufd::smmu::{SmmuIommufdFile, SmmuObjectState};
use vsva_host::iommufd::{IommufdFile, ObjectState};
use vsva_host::smmu::SmmuHost;
use vsva_uapi::iommufd::*;
use vsva_uapi::wire::Wire;
use vsva_uapi::{error::Errno, file::EventNotifier, file::UapiFile};
use vsva_vtd::addr::SourceId;

use crate::fault::{FaultPump, VeventPump};
use crate::kind::{FileArg, FileKind, Holdings, ServedFile, UserRange};
use crate::protocol::FILE_IOMMUFD;

/// How many bytes a user pointer names, from fields of the same argument (offsets in
/// bytes, little-endian).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Count {
    /// A u64 byte count at this offset.
    Bytes64(usize),
    /// A u32 byte count at this offset.
    Bytes32(usize),
    /// A u32 element count times a fixed element size.
    Elements {
        /// Offset of the count.
        count: usize,
        /// Bytes of one element.
        size: u64,
    },
    /// A u32 element count times a u32 element length.
    Entries {
        /// Offset of the count.
        count: usize,
        /// Offset of the element length.
        len: usize,
    },
    /// A dirty bitmap: one bit a page in whole 64-bit words
    /// ([`DirtyBitmap::bytes_needed`]).
    Bitmap {
        /// Offset of the u64 IOVA length.
        length: usize,
        /// Offset of the u64 page size.
        page_size: usize,
    },
}

/// A user pointer in an ioctl argument: the u64 address at `at` and its byte count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pointer {
    /// Offset of the address.
    pub at: usize,
    /// How its bytes are counted.
    pub count: Count,
}

/// One ioctl the kind serves.
#[derive(Clone, Copy, Debug)]
pub struct Served {
    /// The ioctl number.
    pub cmd: u32,
    /// Its name in the kernel's headers.
    pub name: &'static str,
    /// The user pointer its argument carries.
    pub pointer: Option<Pointer>,
    /// The offset of the u32 field where it gives a file descriptor: the reply carries
    /// the file as `SCM_RIGHTS` and the field holds its index there (0).
    pub fd_out: Option<usize>,
    /// How it names a range of a memory file the request carries.
    pub file: Option<FileArg>,
}

const fn plain(cmd: u32, name: &'static str) -> Served {
    Served {
        cmd,
        name,
        pointer: None,
        fd_out: None,
        file: None,
    }
}

const fn with(cmd: u32, name: &'static str, at: usize, count: Count) -> Served {
    Served {
        cmd,
        name,
        pointer: Some(Pointer { at, count }),
        fd_out: None,
        file: None,
    }
}

const fn giving_fd(cmd: u32, name: &'static str, at: usize) -> Served {
    Served {
        cmd,
        name,
        pointer: None,
        fd_out: Some(at),
        file: None,
    }
}

/// `IOMMU_IOAS_MAP_FILE`: the memfd goes with the request and the host file maps it
/// ([`ServedFile::map_file`]).
const MAP_FILE: Served = Served {
    cmd: IOMMU_IOAS_MAP_FILE,
    name: "IOMMU_IOAS_MAP_FILE",
    pointer: None,
    fd_out: None,
    file: Some(FileArg {
        fd_at: offset_of!(IommuIoasMapFile, fd),
    }),
};

/// Queue files (fault queues and vEVENT queues together) one connection may have served
/// at once (each is a socket pair and a thread of the host); one more is `EMFILE`, as a
/// process out of file descriptors.
pub const MAX_QUEUES: usize = 4;

const ALLOW_IOVAS: Served = with(
    IOMMU_IOAS_ALLOW_IOVAS,
    "IOMMU_IOAS_ALLOW_IOVAS",
    offset_of!(IommuIoasAllowIovas, allowed_iovas),
    Count::Elements {
        count: offset_of!(IommuIoasAllowIovas, num_iovas),
        size: size_of::<IommuIovaRange>() as u64,
    },
);
const IOVA_RANGES: Served = with(
    IOMMU_IOAS_IOVA_RANGES,
    "IOMMU_IOAS_IOVA_RANGES",
    offset_of!(IommuIoasIovaRanges, allowed_iovas),
    Count::Elements {
        count: offset_of!(IommuIoasIovaRanges, num_iovas),
        size: size_of::<IommuIovaRange>() as u64,
    },
);
const MAP: Served = with(
    IOMMU_IOAS_MAP,
    "IOMMU_IOAS_MAP",
    offset_of!(IommuIoasMap, user_va),
    Count::Bytes64(offset_of!(IommuIoasMap, length)),
);
const HWPT_ALLOC: Served = with(
    IOMMU_HWPT_ALLOC,
    "IOMMU_HWPT_ALLOC",
    offset_of!(IommuHwptAlloc, data_uptr),
    Count::Bytes32(offset_of!(IommuHwptAlloc, data_len)),
);
const GET_HW_INFO: Served = with(
    IOMMU_GET_HW_INFO,
    "IOMMU_GET_HW_INFO",
    offset_of!(IommuHwInfo, data_uptr),
    Count::Bytes32(offset_of!(IommuHwInfo, data_len)),
);
const HWPT_INVALIDATE: Served = with(
    IOMMU_HWPT_INVALIDATE,
    "IOMMU_HWPT_INVALIDATE",
    offset_of!(IommuHwptInvalidate, data_uptr),
    Count::Entries {
        count: offset_of!(IommuHwptInvalidate, entry_num),
        len: offset_of!(IommuHwptInvalidate, entry_len),
    },
);
const FAULT_QUEUE_ALLOC: Served = giving_fd(
    IOMMU_FAULT_QUEUE_ALLOC,
    "IOMMU_FAULT_QUEUE_ALLOC",
    offset_of!(IommuFaultAlloc, out_fault_fd),
);
const ATTACH: Served = plain(
    VFIO_DEVICE_ATTACH_IOMMUFD_PT,
    "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
);
const DETACH: Served = plain(
    VFIO_DEVICE_DETACH_IOMMUFD_PT,
    "VFIO_DEVICE_DETACH_IOMMUFD_PT",
);

const SET_DIRTY_TRACKING: Served = plain(
    IOMMU_HWPT_SET_DIRTY_TRACKING,
    "IOMMU_HWPT_SET_DIRTY_TRACKING",
);

const GET_DIRTY_BITMAP: Served = with(
    IOMMU_HWPT_GET_DIRTY_BITMAP,
    "IOMMU_HWPT_GET_DIRTY_BITMAP",
    offset_of!(IommuHwptGetDirtyBitmap, data),
    Count::Bitmap {
        length: offset_of!(IommuHwptGetDirtyBitmap, length),
        page_size: offset_of!(IommuHwptGetDirtyBitmap, page_size),
    },
);

/// Every ioctl an iommufd connection on a VT-d host serves; docs/protocol.md lists the
/// same.
pub const IOCTLS: &[Served] = &[
    plain(IOMMU_DESTROY, "IOMMU_DESTROY"),
    plain(IOMMU_IOAS_ALLOC, "IOMMU_IOAS_ALLOC"),
    ALLOW_IOVAS,
    plain(IOMMU_IOAS_COPY, "IOMMU_IOAS_COPY"),
    IOVA_RANGES,
    MAP,
    MAP_FILE,
    plain(IOMMU_IOAS_UNMAP, "IOMMU_IOAS_UNMAP"),
    HWPT_ALLOC,
    GET_HW_INFO,
    SET_DIRTY_TRACKING,
    GET_DIRTY_BITMAP,
    HWPT_INVALIDATE,
    FAULT_QUEUE_ALLOC,
    ATTACH,
    DETACH,
];

/// Every ioctl an iommufd connection on an SMMUv3 host serves; docs/protocol.md lists the
/// same. The IOAS and HWPT rows are VT-d's, without dirty tracking (the SMMU file has
/// none); the vIOMMU family, `VEVENTQ_ALLOC` giving its queue as `FAULT_QUEUE_ALLOC` gives
/// a fault queue. `FAULT_QUEUE_ALLOC` reaches the SMMU file, which answers for itself.
pub const SMMU_IOCTLS: &[Served] = &[
    plain(IOMMU_DESTROY, "IOMMU_DESTROY"),
    plain(IOMMU_IOAS_ALLOC, "IOMMU_IOAS_ALLOC"),
    ALLOW_IOVAS,
    plain(IOMMU_IOAS_COPY, "IOMMU_IOAS_COPY"),
    IOVA_RANGES,
    MAP,
    MAP_FILE,
    plain(IOMMU_IOAS_UNMAP, "IOMMU_IOAS_UNMAP"),
    HWPT_ALLOC,
    GET_HW_INFO,
    SET_DIRTY_TRACKING,
    GET_DIRTY_BITMAP,
    HWPT_INVALIDATE,
    FAULT_QUEUE_ALLOC,
    with(
        IOMMU_VIOMMU_ALLOC,
        "IOMMU_VIOMMU_ALLOC",
        offset_of!(IommuViommuAlloc, data_uptr),
        Count::Bytes32(offset_of!(IommuViommuAlloc, data_len)),
    ),
    plain(IOMMU_VDEVICE_ALLOC, "IOMMU_VDEVICE_ALLOC"),
    giving_fd(
        IOMMU_VEVENTQ_ALLOC,
        "IOMMU_VEVENTQ_ALLOC",
        offset_of!(IommuVeventqAlloc, out_veventq_fd),
    ),
    ATTACH,
    DETACH,
];

/// The row for `cmd` in either table (a row both tables have is the same in each): how a
/// client finds the descriptors an ioctl gives or takes, whatever the host's IOMMU.
pub fn served(cmd: u32) -> Option<&'static Served> {
    row(IOCTLS, cmd).or_else(|| row(SMMU_IOCTLS, cmd))
}

fn u32_at(arg: &[u8], at: usize) -> Result<u64, Errno> {
    let b = arg.get(at..at + 4).ok_or(Errno::EINVAL)?;
    Ok(u64::from(u32::from_le_bytes(
        b.try_into().expect("4 bytes"),
    )))
}

fn u64_at(arg: &[u8], at: usize) -> Result<u64, Errno> {
    let b = arg.get(at..at + 8).ok_or(Errno::EINVAL)?;
    Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
}

impl Pointer {
    /// The pointer's range in `arg`; EINVAL when `arg` is too short to hold the fields.
    pub fn range(&self, arg: &[u8]) -> Result<UserRange, Errno> {
        u64_at(arg, self.at)?;
        let len = match self.count {
            Count::Bytes64(at) => u64_at(arg, at)?,
            Count::Bytes32(at) => u32_at(arg, at)?,
            Count::Elements { count, size } => u32_at(arg, count)? * size,
            Count::Entries { count, len } => u32_at(arg, count)? * u32_at(arg, len)?,
            Count::Bitmap { length, page_size } => {
                DirtyBitmap::bytes_needed(u64_at(arg, length)?, u64_at(arg, page_size)?)
            }
        };
        Ok(UserRange {
            at: self.at,
            len,
            empty_ok: true,
        })
    }
}

/// iommufd files over a host IOMMU driver, each in its own fd table (one VMM process).
pub enum IommufdKind {
    /// On the host VT-d driver's unit ([`IOCTLS`]).
    Vtd(Arc<HostIommu>),
    /// On the host SMMUv3 driver ([`SMMU_IOCTLS`]).
    Smmu(Arc<SmmuHost>),
}

impl IommufdKind {
    /// The ioctls its files serve.
    fn table(&self) -> &'static [Served] {
        match self {
            IommufdKind::Vtd(_) => IOCTLS,
            IommufdKind::Smmu(_) => SMMU_IOCTLS,
        }
    }
}

impl FileKind for IommufdKind {
    fn id(&self) -> u32 {
        FILE_IOMMUFD
    }

    fn open(&self) -> Result<Arc<dyn ServedFile>, Errno> {
        let fds = Iommufds::new();
        let (fd, file) = match self {
            IommufdKind::Vtd(unit) => {
                let (fd, file) = fds.open(unit);
                (fd, Opened::Vtd(file))
            }
            IommufdKind::Smmu(smmu) => {
                let (fd, file) = fds.open_smmu(smmu);
                (fd, Opened::Smmu(file))
            }
        };
        Ok(Arc::new(ServedIommufd {
            fds,
            fd,
            file,
            device: Mutex::new(None),
            pumps: Mutex::new(Vec::new()),
            vevents: Mutex::new(Vec::new()),
        }))
    }

    fn user_range(&self, cmd: u32, arg: &[u8]) -> Result<Option<UserRange>, Errno> {
        user_range_in(self.table(), cmd, arg)
    }

    fn file_arg(&self, cmd: u32) -> Option<FileArg> {
        row(self.table(), cmd).and_then(|s| s.file)
    }
}

fn row(table: &'static [Served], cmd: u32) -> Option<&'static Served> {
    table.iter().find(|s| s.cmd == cmd)
}

/// The user range [`IOCTLS`] gives the ioctl `cmd` with argument `arg`; ENOTTY for an
/// ioctl not in the table, EINVAL for an argument too short to hold its fields.
pub fn user_range(cmd: u32, arg: &[u8]) -> Result<Option<UserRange>, Errno> {
    user_range_in(IOCTLS, cmd, arg)
}

/// As [`user_range`], in `table`.
pub fn user_range_in(
    table: &'static [Served],
    cmd: u32,
    arg: &[u8],
) -> Result<Option<UserRange>, Errno> {
    let served = row(table, cmd).ok_or(Errno::ENOTTY)?;
    served.pointer.map(|p| p.range(arg)).transpose()
}

/// The `/dev/iommu` a connection opened, on the host's VT-d or SMMUv3.
enum Opened {
    Vtd(Arc<IommufdFile>),
    Smmu(Arc<SmmuIommufdFile>),
}

impl Opened {
    fn uapi(&self) -> &dyn UapiFile {
        match self {
            Opened::Vtd(f) => &**f,
            Opened::Smmu(f) => &**f,
        }
    }
}

/// An open `/dev/iommu` and the VFIO cdev of the connection's device, bound to it: the
/// cdev's attach and detach ioctls go to the device, the rest to the iommufd.
pub struct ServedIommufd {
    fds: Arc<Iommufds>,
    fd: i32,
    file: Opened,
    device: Mutex<Option<VfioDeviceFile>>,
    /// The fault queues handed to the client.
    pumps: Mutex<Vec<FaultPump>>,
    /// The vEVENT queues handed to the client.
    vevents: Mutex<Vec<VeventPump>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ServedIommufd {
    fn device(&self) -> std::sync::MutexGuard<'_, Option<VfioDeviceFile>> {
        lock(&self.device)
    }

    /// Queue files served now, forgetting those whose object is gone; `EMFILE` when
    /// [`MAX_QUEUES`] are.
    fn room_for_a_queue(
        pumps: &mut Vec<FaultPump>,
        vevents: &mut Vec<VeventPump>,
    ) -> Result<(), Errno> {
        pumps.retain(|p| p.file().is_some());
        vevents.retain(|p| p.file().is_some());
        if pumps.len() + vevents.len() >= MAX_QUEUES {
            return Err(Errno::new(libc::EMFILE));
        }
        Ok(())
    }

    /// Destroys object `id` made by a call whose queue could not be served.
    fn destroy(&self, id: u32) {
        let mut destroy = IommuDestroy {
            size: size_of::<IommuDestroy>() as u32,
            id,
        }
        .to_bytes();
        if let Err(d) = self.file.uapi().ioctl(IOMMU_DESTROY, &mut destroy) {
            tracing::error!("destroying a queue that was not served: {d}");
        }
    }

    /// `IOMMU_FAULT_QUEUE_ALLOC`: the fault queue is made in the file's fd table, taken
    /// out of it and served on a socket pair whose other end the client gets
    /// ([`Self::queue_alloc`]).
    fn fault_queue_alloc(&self, arg: &mut [u8]) -> Result<(usize, Option<OwnedFd>), Errno> {
        let at = (
            offset_of!(IommuFaultAlloc, out_fault_id),
            offset_of!(IommuFaultAlloc, out_fault_fd),
        );
        self.queue_alloc(
            IOMMU_FAULT_QUEUE_ALLOC,
            arg,
            at,
            |fd| self.fds.fault(fd),
            FaultPump::start,
            |pumps, _, pump| pumps.push(pump),
        )
    }

    /// `IOMMU_VEVENTQ_ALLOC` on an SMMUv3 host: as [`Self::fault_queue_alloc`], the
    /// vEVENT queue's file served on a socket pair.
    fn veventq_alloc(&self, arg: &mut [u8]) -> Result<(usize, Option<OwnedFd>), Errno> {
        let at = (
            offset_of!(IommuVeventqAlloc, out_veventq_id),
            offset_of!(IommuVeventqAlloc, out_veventq_fd),
        );
        self.queue_alloc(
            IOMMU_VEVENTQ_ALLOC,
            arg,
            at,
            |fd| self.fds.veventq(fd),
            VeventPump::start,
            |_, vevents, pump| vevents.push(pump),
        )
    }

    /// Runs `cmd`, which makes a queue object (its id at `id_at` and its fd in the file's
    /// fd table at `fd_at` of the argument), then `take`s the queue out of the table,
    /// `start`s serving it on a socket pair and `keep`s the pump; the client gets the
    /// pair's other end (the argument's fd reads 0). If the queue cannot be served the
    /// object is destroyed again and the argument is as it came, so a failed call leaves
    /// nothing.
    fn queue_alloc<Q, P>(
        &self,
        cmd: u32,
        arg: &mut [u8],
        (id_at, fd_at): (usize, usize),
        take: impl FnOnce(i32) -> Option<Q>,
        start: impl FnOnce(&Q) -> Result<(P, OwnedFd), Errno>,
        keep: impl FnOnce(&mut Vec<FaultPump>, &mut Vec<VeventPump>, P),
    ) -> Result<(usize, Option<OwnedFd>), Errno> {
        let (mut pumps, mut vevents) = (lock(&self.pumps), lock(&self.vevents));
        Self::room_for_a_queue(&mut pumps, &mut vevents)?;
        let asked = arg.to_vec();
        let n = self.file.uapi().ioctl(cmd, arg)?;
        let word = |at: usize| {
            arg.get(at..at + 4)
                .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        let (id, fd) = (word(id_at), word(fd_at) as i32);
        let queue = take(fd);
        self.fds.close(fd);
        match queue.ok_or(Errno::EIO).and_then(|q| start(&q)) {
            Ok((pump, theirs)) => {
                keep(&mut pumps, &mut vevents, pump);
                arg[fd_at..fd_at + 4].copy_from_slice(&0u32.to_le_bytes());
                Ok((n, Some(theirs)))
            }
            Err(e) => {
                self.destroy(id);
                arg.copy_from_slice(&asked);
                Err(e)
            }
        }
    }
}

impl Drop for ServedIommufd {
    /// The queues' pumps stop (the client's ends read EOF), the device's cdev closes
    /// (detaching it), then the iommufd's fd.
    fn drop(&mut self) {
        lock(&self.pumps).clear();
        lock(&self.vevents).clear();
        self.device().take();
        self.fds.close(self.fd);
    }
}

impl UapiFile for ServedIommufd {
    fn ioctl(&self, cmd: u32, arg: &mut [u8]) -> Result<usize, Errno> {
        if cmd == VFIO_DEVICE_ATTACH_IOMMUFD_PT || cmd == VFIO_DEVICE_DETACH_IOMMUFD_PT {
            return match &*self.device() {
                Some(d) => d.ioctl(cmd, arg),
                None => Err(Errno::ENODEV),
            };
        }
        self.file.uapi().ioctl(cmd, arg)
    }

    fn read(&self, buf: &mut [u8]) -> Result<usize, Errno> {
        self.file.uapi().read(buf)
    }

    fn write(&self, buf: &[u8]) -> Result<usize, Errno> {
        self.file.uapi().write(buf)
    }

    fn set_event_notifier(&self, notifier: Option<Arc<dyn EventNotifier>>) {
        self.file.uapi().set_event_notifier(notifier);
    }
}

impl ServedFile for ServedIommufd {
    fn map_file(
        &self,
        arg: &mut [u8],
        file: Option<OwnedFd>,
        files: &mut dyn MemoryFiles,
    ) -> Result<usize, Errno> {
        match &self.file {
            Opened::Vtd(f) => f.map_file(arg, file, files),
            Opened::Smmu(f) => f.map_file(arg, file, files),
        }
        .map(|()| 0)
    }

    /// The IOAS areas mapped (what the type1 container counts as DMA mappings); as binds,
    /// on VT-d the PASIDs attached, on SMMUv3 the devices whose STE is a guest's (attached
    /// to a nested HWPT); the fault queues' groups waiting for a response (those sent to
    /// the client's socket and not answered included); as unread faults, the fault records
    /// not sent yet and the vEVENTs waiting in their queues.
    fn holdings(&self) -> Holdings {
        let mut h = Holdings::default();
        for f in lock(&self.pumps).iter().filter_map(FaultPump::file) {
            let (waiting, unread) = f.pending();
            h.page_requests += waiting as u64;
            h.faults_unread += unread as u64;
        }
        for q in lock(&self.vevents).iter().filter_map(VeventPump::file) {
            h.faults_unread += q.pending() as u64;
        }
        match &self.file {
            Opened::Vtd(file) => {
                for o in file.lock().objects().values() {
                    match o {
                        ObjectState::Ioas(areas) => h.dma_mappings += areas.len() as u64,
                        ObjectState::Device { pasids, .. } => h.binds += pasids.len() as u64,
                        _ => {}
                    }
                }
            }
            Opened::Smmu(file) => {
                let objects = file.lock().objects();
                for o in objects.values() {
                    match o {
                        SmmuObjectState::Ioas(areas) => h.dma_mappings += areas.len() as u64,
                        SmmuObjectState::Device {
                            hwpt: Some(hwpt), ..
                        } => {
                            if matches!(objects.get(hwpt), Some(SmmuObjectState::HwptNested { .. }))
                            {
                                h.binds += 1;
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        h
    }

    fn ioctl_giving_fd(&self, cmd: u32, arg: &mut [u8]) -> Result<(usize, Option<OwnedFd>), Errno> {
        match cmd {
            IOMMU_FAULT_QUEUE_ALLOC => self.fault_queue_alloc(arg),
            IOMMU_VEVENTQ_ALLOC => self.veventq_alloc(arg),
            _ => self.ioctl(cmd, arg).map(|n| (n, None)),
        }
    }

    /// Opens the device's cdev and binds it to this iommufd (`VFIO_DEVICE_BIND_IOMMUFD`);
    /// the reply carries its `out_devid` (u32). It is attached to nothing until the client
    /// attaches it.
    fn attach_device(&self, sid: SourceId) -> Result<Vec<u8>, Errno> {
        let mut device = self.device();
        if device.is_some() {
            return Err(Errno::EEXIST);
        }
        let dev = VfioDeviceFile::open(sid, self.fds.clone());
        let mut arg = VfioDeviceBindIommufd {
            argsz: size_of::<VfioDeviceBindIommufd>() as u32,
            iommufd: self.fd,
            ..Default::default()
        }
        .to_bytes();
        dev.ioctl(VFIO_DEVICE_BIND_IOMMUFD, &mut arg)?;
        let dev_id = dev.dev_id().ok_or(Errno::EIO)?;
        *device = Some(dev);
        Ok(dev_id.to_le_bytes().to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(cmd: u32, arg: &[u8]) -> Result<Option<(usize, u64)>, Errno> {
        Ok(user_range(cmd, arg)?.map(|r| (r.at, r.len)))
    }

    #[test]
    fn each_pointer_is_counted_from_its_own_argument() {
        let map = IommuIoasMap {
            size: 40,
            user_va: 0x7000_0000,
            length: 0x5000,
            ..Default::default()
        };
        assert_eq!(
            range(IOMMU_IOAS_MAP, &map.to_bytes()),
            Ok(Some((16, 0x5000)))
        );
        let inv = IommuHwptInvalidate {
            size: 32,
            data_uptr: 0x7000_0000,
            entry_len: 24,
            entry_num: 3,
            ..Default::default()
        };
        assert_eq!(
            range(IOMMU_HWPT_INVALIDATE, &inv.to_bytes()),
            Ok(Some((8, 72)))
        );
        let ranges = IommuIoasIovaRanges {
            size: 32,
            num_iovas: 5,
            ..Default::default()
        };
        assert_eq!(
            range(IOMMU_IOAS_IOVA_RANGES, &ranges.to_bytes()),
            Ok(Some((16, 80)))
        );
        // 1 GiB at 4 KiB: 262144 bits, 4096 words.
        let dirty = IommuHwptGetDirtyBitmap {
            size: 48,
            length: 1 << 30,
            page_size: 4096,
            ..Default::default()
        };
        assert_eq!(
            range(IOMMU_HWPT_GET_DIRTY_BITMAP, &dirty.to_bytes()),
            Ok(Some((40, 32768)))
        );
        let mut hw = hw_info(40, 0, 1, 0);
        hw.data_len = 24;
        assert_eq!(range(IOMMU_GET_HW_INFO, &hw.to_bytes()), Ok(Some((16, 24))));
        let alloc = IommuHwptAlloc {
            size: 48,
            data_len: 24,
            ..Default::default()
        };
        assert_eq!(
            range(IOMMU_HWPT_ALLOC, &alloc.to_bytes()),
            Ok(Some((32, 24)))
        );
        assert_eq!(range(IOMMU_IOAS_ALLOC, &[0; 12]), Ok(None));
    }

    #[test]
    fn short_arguments_and_unserved_ioctls_never_reach_the_file() {
        assert_eq!(range(IOMMU_IOAS_MAP, &[0; 24]), Err(Errno::EINVAL));
        assert_eq!(range(IOMMU_HWPT_INVALIDATE, &[0; 20]), Err(Errno::EINVAL));
        assert_eq!(range(IOMMU_FAULT_QUEUE_ALLOC, &[0; 16]), Ok(None));
        assert_eq!(range(IOMMU_IOAS_MAP_FILE, &[0; 40]), Ok(None));
        for cmd in [IOMMU_VIOMMU_ALLOC, VFIO_DEVICE_BIND_IOMMUFD, 0] {
            assert_eq!(range(cmd, &[0; 64]), Err(Errno::ENOTTY));
        }
    }

    #[test]
    fn every_pointer_and_count_lies_in_its_structure() {
        let sizes = [
            (IOMMU_IOAS_ALLOW_IOVAS, size_of::<IommuIoasAllowIovas>()),
            (IOMMU_IOAS_IOVA_RANGES, size_of::<IommuIoasIovaRanges>()),
            (IOMMU_IOAS_MAP, size_of::<IommuIoasMap>()),
            (IOMMU_HWPT_ALLOC, size_of::<IommuHwptAlloc>()),
            (IOMMU_GET_HW_INFO, size_of::<IommuHwInfo>()),
            (
                IOMMU_HWPT_GET_DIRTY_BITMAP,
                size_of::<IommuHwptGetDirtyBitmap>(),
            ),
            (IOMMU_HWPT_INVALIDATE, size_of::<IommuHwptInvalidate>()),
        ];
        for s in IOCTLS {
            let Some(p) = s.pointer else { continue };
            let (_, size) = sizes.iter().find(|(c, _)| *c == s.cmd).expect(s.name);
            // The whole structure holds every field; one byte less does not.
            assert!(p.range(&vec![0; *size]).is_ok(), "{}", s.name);
            assert_eq!(
                p.range(&vec![0; p.at + 7]),
                Err(Errno::EINVAL),
                "{}",
                s.name
            );
        }
    }
}
