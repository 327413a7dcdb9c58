//! The iommufd file kind: a connection that opens `/dev/iommu` on the host VT-d driver.
//!
//! Every ioctl the kind serves is in [`IOCTLS`], with the user pointer its argument
//! carries, if any, and how the bytes it names are counted from the argument's own
//! fields, so that the server translates exactly the range the file will touch (as the
//! kernel's `copy_from_user`/`copy_to_user` of that range would fault outside the
//! caller's memory). An ioctl that is not in the table never reaches the file (ENOTTY):
//! one whose pointer is not described cannot pass untranslated. The table also names the
//! field where an ioctl gives a file descriptor: `FAULT_QUEUE_ALLOC`'s fault queue reaches
//! the client as one end of a socket pair the host serves ([`crate::fault`]), sent with
//! the reply. It names the field of a memory file too: `IOAS_MAP_FILE` takes the memfd
//! with the request and the host file maps the file's own pages in place, through the
//! connection's windows (`vsva_host::iommufd::map_file`, the same code as in process). The cdev's `BIND_IOMMUFD` is not served; `DEVICE_ADD` binds the
//! connection's device instead.

use std::mem::{offset_of, size_of};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, PoisonError};

use vsva_host::driver::{DirtyBitmap, HostIommu};
use vsva_host::iommufd::device::{Iommufds, VfioDeviceFile};
use vsva_host::iommufd::map_file::MemoryFiles;
use vsva_host::iommufd::{IommufdFile, ObjectState};
use vsva_uapi::iommufd::*;
use vsva_uapi::wire::{read_prefix, Wire};
use vsva_uapi::{error::Errno, file::EventNotifier, file::UapiFile};
use vsva_vtd::addr::SourceId;

use crate::fault::FaultPump;
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

/// Fault queues one connection may have served at once (each is a socket pair and a
/// thread of the host); one more is `EMFILE`, as a process out of file descriptors.
pub const MAX_FAULT_QUEUES: usize = 4;

/// Every ioctl an iommufd connection serves; docs/protocol.md lists the same.
pub const IOCTLS: &[Served] = &[
    plain(IOMMU_DESTROY, "IOMMU_DESTROY"),
    plain(IOMMU_IOAS_ALLOC, "IOMMU_IOAS_ALLOC"),
    with(
        IOMMU_IOAS_ALLOW_IOVAS,
        "IOMMU_IOAS_ALLOW_IOVAS",
        offset_of!(IommuIoasAllowIovas, allowed_iovas),
        Count::Elements {
            count: offset_of!(IommuIoasAllowIovas, num_iovas),
            size: size_of::<IommuIovaRange>() as u64,
        },
    ),
    plain(IOMMU_IOAS_COPY, "IOMMU_IOAS_COPY"),
    with(
        IOMMU_IOAS_IOVA_RANGES,
        "IOMMU_IOAS_IOVA_RANGES",
        offset_of!(IommuIoasIovaRanges, allowed_iovas),
        Count::Elements {
            count: offset_of!(IommuIoasIovaRanges, num_iovas),
            size: size_of::<IommuIovaRange>() as u64,
        },
    ),
    with(
        IOMMU_IOAS_MAP,
        "IOMMU_IOAS_MAP",
        offset_of!(IommuIoasMap, user_va),
        Count::Bytes64(offset_of!(IommuIoasMap, length)),
    ),
    MAP_FILE,
    plain(IOMMU_IOAS_UNMAP, "IOMMU_IOAS_UNMAP"),
    with(
        IOMMU_HWPT_ALLOC,
        "IOMMU_HWPT_ALLOC",
        offset_of!(IommuHwptAlloc, data_uptr),
        Count::Bytes32(offset_of!(IommuHwptAlloc, data_len)),
    ),
    with(
        IOMMU_GET_HW_INFO,
        "IOMMU_GET_HW_INFO",
        offset_of!(IommuHwInfo, data_uptr),
        Count::Bytes32(offset_of!(IommuHwInfo, data_len)),
    ),
    plain(
        IOMMU_HWPT_SET_DIRTY_TRACKING,
        "IOMMU_HWPT_SET_DIRTY_TRACKING",
    ),
    with(
        IOMMU_HWPT_GET_DIRTY_BITMAP,
        "IOMMU_HWPT_GET_DIRTY_BITMAP",
        offset_of!(IommuHwptGetDirtyBitmap, data),
        Count::Bitmap {
            length: offset_of!(IommuHwptGetDirtyBitmap, length),
            page_size: offset_of!(IommuHwptGetDirtyBitmap, page_size),
        },
    ),
    with(
        IOMMU_HWPT_INVALIDATE,
        "IOMMU_HWPT_INVALIDATE",
        offset_of!(IommuHwptInvalidate, data_uptr),
        Count::Entries {
            count: offset_of!(IommuHwptInvalidate, entry_num),
            len: offset_of!(IommuHwptInvalidate, entry_len),
        },
    ),
    giving_fd(
        IOMMU_FAULT_QUEUE_ALLOC,
        "IOMMU_FAULT_QUEUE_ALLOC",
        offset_of!(IommuFaultAlloc, out_fault_fd),
    ),
    plain(
        VFIO_DEVICE_ATTACH_IOMMUFD_PT,
        "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
    ),
    plain(
        VFIO_DEVICE_DETACH_IOMMUFD_PT,
        "VFIO_DEVICE_DETACH_IOMMUFD_PT",
    ),
];

/// The table's row for `cmd`.
pub fn served(cmd: u32) -> Option<&'static Served> {
    IOCTLS.iter().find(|s| s.cmd == cmd)
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

/// iommufd files over the host VT-d driver, each in its own fd table (one VMM process).
pub struct IommufdKind {
    /// The host VT-d driver's unit.
    pub unit: Arc<HostIommu>,
}

impl FileKind for IommufdKind {
    fn id(&self) -> u32 {
        FILE_IOMMUFD
    }

    fn open(&self) -> Result<Arc<dyn ServedFile>, Errno> {
        let fds = Iommufds::new();
        let (fd, file) = fds.open(&self.unit);
        Ok(Arc::new(ServedIommufd {
            fds,
            fd,
            file,
            device: Mutex::new(None),
            pumps: Mutex::new(Vec::new()),
        }))
    }

    fn user_range(&self, cmd: u32, arg: &[u8]) -> Result<Option<UserRange>, Errno> {
        user_range(cmd, arg)
    }

    fn file_arg(&self, cmd: u32) -> Option<FileArg> {
        served(cmd).and_then(|s| s.file)
    }
}

/// The user range [`IOCTLS`] gives the ioctl `cmd` with argument `arg`; ENOTTY for an
/// ioctl not in the table, EINVAL for an argument too short to hold its fields.
pub fn user_range(cmd: u32, arg: &[u8]) -> Result<Option<UserRange>, Errno> {
    let served = served(cmd).ok_or(Errno::ENOTTY)?;
    served.pointer.map(|p| p.range(arg)).transpose()
}

/// An open `/dev/iommu` and the VFIO cdev of the connection's device, bound to it: the
/// cdev's attach and detach ioctls go to the device, the rest to the iommufd.
pub struct ServedIommufd {
    fds: Arc<Iommufds>,
    fd: i32,
    file: Arc<IommufdFile>,
    device: Mutex<Option<VfioDeviceFile>>,
    /// The fault queues handed to the client.
    pumps: Mutex<Vec<FaultPump>>,
}

impl ServedIommufd {
    fn device(&self) -> std::sync::MutexGuard<'_, Option<VfioDeviceFile>> {
        self.device.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn pumps(&self) -> std::sync::MutexGuard<'_, Vec<FaultPump>> {
        self.pumps.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `IOMMU_FAULT_QUEUE_ALLOC`: the fault queue is made in the file's fd table, taken
    /// out of it and served on a socket pair whose other end the client gets. If it cannot
    /// be served the queue is destroyed again, so a failed call leaves nothing.
    fn fault_queue_alloc(&self, arg: &mut [u8]) -> Result<(usize, Option<OwnedFd>), Errno> {
        let mut pumps = self.pumps();
        pumps.retain(|p| p.file().is_some());
        if pumps.len() >= MAX_FAULT_QUEUES {
            return Err(Errno::new(libc::EMFILE));
        }
        let n = self.file.ioctl(IOMMU_FAULT_QUEUE_ALLOC, arg)?;
        let out: IommuFaultAlloc = read_prefix(arg, arg.len());
        let fd = out.out_fault_fd as i32;
        let queue = self.fds.fault(fd);
        self.fds.close(fd);
        let started = queue.ok_or(Errno::EIO).and_then(|q| FaultPump::start(&q));
        match started {
            Ok((pump, theirs)) => {
                pumps.push(pump);
                let at = offset_of!(IommuFaultAlloc, out_fault_fd);
                arg[at..at + 4].copy_from_slice(&0u32.to_le_bytes());
                Ok((n, Some(theirs)))
            }
            Err(e) => {
                let mut destroy = IommuDestroy {
                    size: size_of::<IommuDestroy>() as u32,
                    id: out.out_fault_id,
                }
                .to_bytes();
                if let Err(d) = self.file.ioctl(IOMMU_DESTROY, &mut destroy) {
                    tracing::error!("destroying a fault queue that was not served: {d}");
                }
                Err(e)
            }
        }
    }
}

impl Drop for ServedIommufd {
    /// The fault queues' pumps stop (the client's ends read EOF), the device's cdev
    /// closes (detaching it), then the iommufd's fd.
    fn drop(&mut self) {
        self.pumps().clear();
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
        self.file.ioctl(cmd, arg)
    }

    fn read(&self, buf: &mut [u8]) -> Result<usize, Errno> {
        self.file.read(buf)
    }

    fn write(&self, buf: &[u8]) -> Result<usize, Errno> {
        self.file.write(buf)
    }

    fn set_event_notifier(&self, notifier: Option<Arc<dyn EventNotifier>>) {
        self.file.set_event_notifier(notifier);
    }
}

impl ServedFile for ServedIommufd {
    fn map_file(
        &self,
        arg: &mut [u8],
        file: Option<OwnedFd>,
        files: &mut dyn MemoryFiles,
    ) -> Result<usize, Errno> {
        self.file.map_file(arg, file, files).map(|()| 0)
    }

    /// The IOAS areas mapped and the PASIDs attached (what the type1 container counts as
    /// DMA mappings and binds); the fault queues' groups waiting for a response (those
    /// sent to the client's socket and not answered included) and records not sent yet.
    fn holdings(&self) -> Holdings {
        let mut h = Holdings::default();
        for f in self.pumps().iter().filter_map(FaultPump::file) {
            let (waiting, unread) = f.pending();
            h.page_requests += waiting as u64;
            h.faults_unread += unread as u64;
        }
        for o in self.file.lock().objects().values() {
            match o {
                ObjectState::Ioas(areas) => h.dma_mappings += areas.len() as u64,
                ObjectState::Device { pasids, .. } => h.binds += pasids.len() as u64,
                _ => {}
            }
        }
        h
    }

    fn ioctl_giving_fd(&self, cmd: u32, arg: &mut [u8]) -> Result<(usize, Option<OwnedFd>), Errno> {
        if cmd == IOMMU_FAULT_QUEUE_ALLOC {
            return self.fault_queue_alloc(arg);
        }
        self.ioctl(cmd, arg).map(|n| (n, None))
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
