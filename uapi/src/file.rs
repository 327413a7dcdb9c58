//! The kernel as a VMM sees it: an open file. [`UapiFile`] is the one boundary between a
//! VMM and the host: `ioctl` on argument bytes, `read`/`write` of the fault queue, and an
//! event notifier for "there is something to read". The host's container implements it
//! in-process; a socket transport or the iommufd uAPI can implement it later.
//!
//! [`VfioIoctls`] holds the typed wrappers, one method per container ioctl (struct in,
//! struct out, as rust-vmm's `vfio-ioctls` does): each encodes its argument, makes the
//! ioctl and decodes what the kernel wrote back. [`IommufdIoctls`] does the same for the
//! iommufd ioctls and the VFIO device cdev calls that join a device to an iommufd, so a
//! VMM's vIOMMU can be written against it.

use std::mem::size_of;
use std::sync::Arc;

use vsva_vtd::{addr::Iova, addr::Pasid, addr::SourceId};

use crate::error::{Errno, UapiError};
use crate::iommu::{IommuCacheInvalidateInfo, IommuGpasidBindData, IommuPageResponse};
use crate::iommufd::{
    hw_info, IommuDestroy, IommuFaultAlloc, IommuHwInfo, IommuHwptAlloc, IommuHwptArmSmmuv3,
    IommuHwptInvalidate, IommuHwptVtdS1, IommuHwptVtdS1Invalidate, IommuIoasAlloc,
    IommuIoasAllowIovas, IommuIoasCopy, IommuIoasIovaRanges, IommuIoasMap, IommuIoasMapFile,
    IommuIoasUnmap, IommuVdeviceAlloc, IommuVeventqAlloc, IommuViommuAlloc,
    IommuViommuArmSmmuv3Invalidate, VfioDeviceAttachIommufdPt, VfioDeviceBindIommufd,
    VfioDeviceDetachIommufdPt, IOMMU_DESTROY, IOMMU_FAULT_QUEUE_ALLOC, IOMMU_GET_HW_INFO,
    IOMMU_HWPT_ALLOC, IOMMU_HWPT_DATA_ARM_SMMUV3, IOMMU_HWPT_DATA_NONE, IOMMU_HWPT_DATA_VTD_S1,
    IOMMU_HWPT_INVALIDATE, IOMMU_HWPT_INVALIDATE_DATA_VTD_S1, IOMMU_IOAS_ALLOC,
    IOMMU_IOAS_ALLOW_IOVAS, IOMMU_IOAS_COPY, IOMMU_IOAS_IOVA_RANGES, IOMMU_IOAS_MAP,
    IOMMU_IOAS_MAP_FILE, IOMMU_IOAS_UNMAP, IOMMU_VDEVICE_ALLOC, IOMMU_VEVENTQ_ALLOC,
    IOMMU_VIOMMU_ALLOC, IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3, VFIO_DEVICE_ATTACH_IOMMUFD_PT,
    VFIO_DEVICE_ATTACH_PASID, VFIO_DEVICE_BIND_IOMMUFD, VFIO_DEVICE_DETACH_IOMMUFD_PT,
    VFIO_DEVICE_DETACH_PASID,
};
use crate::request::{
    BindGpasid, CacheInvalidate, DmaMap, NestingInfo, PageResponse, PasidTableConfig, QueuedFault,
};
use crate::vfio::*;
use crate::wire::{read_prefix, Wire};

/// Signalled once for each record the file queues, as the eventfd VFIO signals for its
/// fault region: it only says "read me". It may run on the reporting thread inside a call
/// on the file, so it must not call back into the file; an eventfd write fits.
pub trait EventNotifier: Send + Sync {
    /// Signals the event.
    fn notify(&self);
}

impl<F: Fn() + Send + Sync> EventNotifier for F {
    fn notify(&self) {
        self()
    }
}

/// An open file of the kernel's IOMMU uAPI (today: a VFIO container).
pub trait UapiFile: Send + Sync {
    /// `ioctl(fd, cmd, arg)`: `arg` holds the structure the argument points to (input, and
    /// output where the kernel writes back); an integer argument is its 8 little-endian
    /// bytes; argument-less ioctls ignore it. Returns the ioctl's non-negative result.
    fn ioctl(&self, cmd: u32, arg: &mut [u8]) -> Result<usize, Errno>;

    /// `read(fd, buf)`: takes as many whole [`VfioIommuType1Fault`] records as fit in `buf`,
    /// oldest first; `EAGAIN` when none is queued, `EINVAL` when `buf` holds less than one.
    fn read(&self, buf: &mut [u8]) -> Result<usize, Errno>;

    /// `write(fd, buf)`: one [`VfioIommuType1PageResponse`], handled as the
    /// `VFIO_IOMMU_PAGE_RESPONSE` ioctl; returns the bytes consumed.
    fn write(&self, buf: &[u8]) -> Result<usize, Errno>;

    /// Registers the notifier signalled for each queued fault record (replacing an earlier
    /// one), or removes it with `None`.
    fn set_event_notifier(&self, notifier: Option<Arc<dyn EventNotifier>>);

    /// Reads every queued fault record and decodes it, oldest first.
    fn read_faults(&self) -> Result<Vec<QueuedFault>, Errno> {
        let mut out = Vec::new();
        self.read_faults_each(&mut |f| out.push(f))?;
        Ok(out)
    }

    /// Reads every queued fault record and hands it to `each` as it is decoded, oldest
    /// first, without collecting them; returns how many. A record that does not decode
    /// ends the read with its error.
    fn read_faults_each(&self, each: &mut dyn FnMut(QueuedFault)) -> Result<usize, Errno> {
        const RECORD: usize = size_of::<VfioIommuType1Fault>();
        let mut read = 0;
        let mut buf = [0u8; RECORD * 16];
        loop {
            let n = match self.read(&mut buf) {
                Ok(n) => n,
                Err(Errno::EAGAIN) => return Ok(read),
                Err(e) => return Err(e),
            };
            for rec in buf[..n].chunks_exact(RECORD) {
                each(QueuedFault::from_record_bytes(rec).map_err(|e| Errno::from(&e))?);
                read += 1;
            }
            if n < buf.len() {
                return Ok(read);
            }
        }
    }
}

impl From<UapiError> for Errno {
    fn from(e: UapiError) -> Errno {
        Errno::from(&e)
    }
}

/// The information `VFIO_IOMMU_GET_INFO` reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Type1Info {
    /// Bitmap of supported page sizes.
    pub iova_pgsizes: u64,
    /// The nesting capability, on a nesting container.
    pub nesting: Option<NestingInfo>,
}

/// The IOMMU model a container is set to with `VFIO_SET_IOMMU`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IommuModel {
    /// `VFIO_TYPE1v2_IOMMU`: one address space, managed with MAP/UNMAP_DMA.
    Type1v2,
    /// `VFIO_TYPE1_NESTING_IOMMU`: MAP/UNMAP_DMA fill the second level; the SVA ioctls
    /// manage first-level (guest) tables per PASID.
    Type1Nesting,
}

impl IommuModel {
    /// The `VFIO_SET_IOMMU` argument.
    pub const fn id(self) -> u64 {
        match self {
            IommuModel::Type1v2 => VFIO_TYPE1V2_IOMMU,
            IommuModel::Type1Nesting => VFIO_TYPE1_NESTING_IOMMU,
        }
    }
}

/// The VFIO container ioctls, typed: one method per ioctl over [`VfioIoctls::raw_ioctl`].
/// Implemented for every `&F` where `F: UapiFile` (errors are [`Errno`]s), and by the
/// host's container itself (errors keep the host's detail).
pub trait VfioIoctls {
    /// What a failed ioctl returns.
    type Error: From<UapiError>;

    /// The byte-level ioctl the wrappers go through.
    fn raw_ioctl(&mut self, cmd: u32, arg: &mut [u8]) -> Result<usize, Self::Error>;

    /// `VFIO_GET_API_VERSION`.
    fn api_version(&mut self) -> Result<u32, Self::Error> {
        Ok(self.raw_ioctl(VFIO_GET_API_VERSION, &mut [])? as u32)
    }

    /// `VFIO_CHECK_EXTENSION`: whether the IOMMU model `ext` is offered.
    fn check_extension(&mut self, ext: u64) -> Result<bool, Self::Error> {
        Ok(self.raw_ioctl(VFIO_CHECK_EXTENSION, &mut ext.to_le_bytes())? == 1)
    }

    /// `VFIO_SET_IOMMU`.
    fn set_iommu(&mut self, model: IommuModel) -> Result<(), Self::Error> {
        self.raw_ioctl(VFIO_SET_IOMMU, &mut model.id().to_le_bytes())?;
        Ok(())
    }

    /// `VFIO_IOMMU_GET_INFO`, with room for the nesting capability.
    fn get_info(&mut self) -> Result<Type1Info, Self::Error> {
        const TOTAL: usize =
            size_of::<VfioIommuType1Info>() + size_of::<VfioIommuType1InfoCapNesting>();
        let mut buf = [0u8; TOTAL];
        buf[..4].copy_from_slice(&(TOTAL as u32).to_le_bytes());
        self.raw_ioctl(VFIO_IOMMU_GET_INFO, &mut buf)?;
        let info: VfioIommuType1Info = read_prefix(&buf, size_of::<VfioIommuType1Info>());
        let nesting = if info.flags & VFIO_IOMMU_INFO_CAPS != 0 && info.cap_offset != 0 {
            let at = info.cap_offset as usize;
            let cap = VfioIommuType1InfoCapNesting::from_bytes(buf.get(at..).unwrap_or(&[]))?;
            Some(NestingInfo::try_from(&cap.info)?)
        } else {
            None
        };
        Ok(Type1Info {
            iova_pgsizes: info.iova_pgsizes,
            nesting,
        })
    }

    /// `VFIO_IOMMU_MAP_DMA`.
    fn map_dma(&mut self, map: &DmaMap) -> Result<(), Self::Error> {
        let mut buf = VfioIommuType1DmaMap::from(map).to_bytes();
        self.raw_ioctl(VFIO_IOMMU_MAP_DMA, &mut buf)?;
        Ok(())
    }

    /// `VFIO_IOMMU_UNMAP_DMA`; returns the bytes unmapped.
    fn unmap_dma(&mut self, iova: Iova, size: u64) -> Result<u64, Self::Error> {
        let mut buf = VfioIommuType1DmaUnmap {
            argsz: size_of::<VfioIommuType1DmaUnmap>() as u32,
            flags: 0,
            iova: iova.raw(),
            size,
            ..Default::default()
        }
        .to_bytes();
        self.raw_ioctl(VFIO_IOMMU_UNMAP_DMA, &mut buf)?;
        let out: VfioIommuType1DmaUnmap = read_prefix(&buf, buf.len());
        Ok(out.size)
    }

    /// `VFIO_IOMMU_PASID_REQUEST` ALLOC: the lowest free PASID in `[min, max]`.
    fn pasid_alloc(&mut self, min: u32, max: u32) -> Result<Pasid, Self::Error> {
        let raw = pasid_request(self, VFIO_IOMMU_FLAG_ALLOC_PASID, min, max)?;
        Ok(Pasid::new(raw as u32).map_err(|e| UapiError::field("PASID", e.to_string()))?)
    }

    /// `VFIO_IOMMU_PASID_REQUEST` FREE of one PASID (EPERM if not the caller's).
    fn pasid_free(&mut self, pasid: Pasid) -> Result<(), Self::Error> {
        pasid_request(self, VFIO_IOMMU_FLAG_FREE_PASID, pasid.raw(), pasid.raw())?;
        Ok(())
    }

    /// `VFIO_IOMMU_PASID_REQUEST` FREE of the caller's PASIDs in `[min, max]`.
    fn pasid_free_range(&mut self, min: u32, max: u32) -> Result<(), Self::Error> {
        pasid_request(self, VFIO_IOMMU_FLAG_FREE_PASID, min, max)?;
        Ok(())
    }

    /// `VFIO_IOMMU_BIND` of a guest page table to `bind.hpasid`.
    fn bind_gpasid(&mut self, bind: &BindGpasid) -> Result<(), Self::Error> {
        bind_request(self, VFIO_IOMMU_BIND, bind)
    }

    /// `VFIO_IOMMU_UNBIND` of `bind.hpasid`.
    fn unbind_gpasid(&mut self, bind: &BindGpasid) -> Result<(), Self::Error> {
        bind_request(self, VFIO_IOMMU_UNBIND, bind)
    }

    /// `VFIO_IOMMU_CACHE_INVALIDATE`.
    fn cache_invalidate(&mut self, inv: &CacheInvalidate) -> Result<(), Self::Error> {
        // The argument's image on the stack: a forwarded invalidation allocates nothing.
        let mut buf = [0u8; size_of::<VfioIommuType1CacheInvalidate>()];
        VfioIommuType1CacheInvalidate {
            argsz: size_of::<VfioIommuType1CacheInvalidate>() as u32,
            flags: 0,
            info: IommuCacheInvalidateInfo::from(inv),
        }
        .write(&mut buf);
        self.raw_ioctl(VFIO_IOMMU_CACHE_INVALIDATE, &mut buf)?;
        Ok(())
    }

    /// `VFIO_IOMMU_ATTACH_PASID_TABLE`.
    fn attach_pasid_table(&mut self, cfg: &PasidTableConfig) -> Result<(), Self::Error> {
        let mut buf = VfioIommuType1AttachPasidTable {
            argsz: size_of::<VfioIommuType1AttachPasidTable>() as u32,
            flags: 0,
            config: cfg.into(),
        }
        .to_bytes();
        self.raw_ioctl(VFIO_IOMMU_ATTACH_PASID_TABLE, &mut buf)?;
        Ok(())
    }

    /// `VFIO_IOMMU_DETACH_PASID_TABLE`.
    fn detach_pasid_table(&mut self) -> Result<(), Self::Error> {
        self.raw_ioctl(VFIO_IOMMU_DETACH_PASID_TABLE, &mut [])?;
        Ok(())
    }

    /// `VFIO_IOMMU_PAGE_RESPONSE` (vsva extension): answers the oldest pending page request
    /// group that `resp` matches, of whichever device. EPERM for a PASID not the caller's,
    /// EINVAL when no group is pending.
    fn page_response(&mut self, resp: &PageResponse) -> Result<(), Self::Error> {
        let mut buf = page_response_bytes(None, resp);
        self.raw_ioctl(VFIO_IOMMU_PAGE_RESPONSE, &mut buf)?;
        Ok(())
    }

    /// `VFIO_IOMMU_PAGE_RESPONSE` (vsva extension) to device `sid`: as
    /// [`VfioIoctls::page_response`], among that device's pending groups only.
    fn page_response_to(&mut self, sid: SourceId, resp: &PageResponse) -> Result<(), Self::Error> {
        let mut buf = page_response_bytes(Some(sid), resp);
        self.raw_ioctl(VFIO_IOMMU_PAGE_RESPONSE, &mut buf)?;
        Ok(())
    }
}

impl<F: UapiFile + ?Sized> VfioIoctls for &F {
    type Error = Errno;

    fn raw_ioctl(&mut self, cmd: u32, arg: &mut [u8]) -> Result<usize, Errno> {
        UapiFile::ioctl(*self, cmd, arg)
    }
}

fn pasid_request<T: VfioIoctls + ?Sized>(
    file: &mut T,
    flags: u32,
    min: u32,
    max: u32,
) -> Result<usize, T::Error> {
    let mut buf = [0u8; size_of::<VfioIommuType1PasidRequest>()];
    VfioIommuType1PasidRequest {
        argsz: size_of::<VfioIommuType1PasidRequest>() as u32,
        flags,
        range: VfioPasidRange { min, max },
    }
    .write(&mut buf);
    file.raw_ioctl(VFIO_IOMMU_PASID_REQUEST, &mut buf)
}

fn bind_request<T: VfioIoctls + ?Sized>(
    file: &mut T,
    cmd: u32,
    bind: &BindGpasid,
) -> Result<(), T::Error> {
    let data = IommuGpasidBindData::from(bind);
    let mut buf = VfioBindGuestPasid {
        header: VfioIommuType1Bind {
            argsz: (size_of::<VfioIommuType1Bind>() + data.argsz as usize) as u32,
            bind_type: VFIO_IOMMU_BIND_GUEST_PASID,
        },
        data,
    }
    .to_bytes();
    file.raw_ioctl(cmd, &mut buf)?;
    Ok(())
}

/// The bytes of a `VFIO_IOMMU_PAGE_RESPONSE` argument (and of a fault-queue `write`).
pub fn page_response_bytes(
    sid: Option<SourceId>,
    resp: &PageResponse,
) -> [u8; size_of::<VfioIommuType1PageResponse>()] {
    VfioIommuType1PageResponse {
        argsz: size_of::<VfioIommuType1PageResponse>() as u32,
        flags: sid.map_or(0, |_| VFIO_IOMMU_PAGE_RESPONSE_RID_VALID),
        rid: sid.map_or(0, |s| s.rid().into()),
        response: IommuPageResponse::from(resp),
    }
    .to_bytes()
}

/// The data of `IOMMU_HWPT_ALLOC` (`data_type`, `data_len`, `data_uptr` of
/// `struct iommu_hwpt_alloc`): what kind of HWPT, and where its driver-specific structure
/// lies in the caller's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HwptData {
    /// `enum iommu_hwpt_data_type`.
    pub data_type: u32,
    /// `data_len`: the bytes at `uptr`.
    pub len: u32,
    /// `data_uptr`: a user address the caller resolved (its memory, not the kernel's).
    pub uptr: u64,
}

impl HwptData {
    /// `IOMMU_HWPT_DATA_NONE`: a paging HWPT on an IOAS.
    pub const NONE: HwptData = HwptData {
        data_type: IOMMU_HWPT_DATA_NONE,
        len: 0,
        uptr: 0,
    };

    /// `IOMMU_HWPT_DATA_VTD_S1`: an [`IommuHwptVtdS1`] at `uptr`.
    pub const fn vtd_s1(uptr: u64) -> HwptData {
        HwptData {
            data_type: IOMMU_HWPT_DATA_VTD_S1,
            len: size_of::<IommuHwptVtdS1>() as u32,
            uptr,
        }
    }

    /// `IOMMU_HWPT_DATA_ARM_SMMUV3`: an [`IommuHwptArmSmmuv3`] (the guest's STE) at `uptr`.
    pub const fn arm_smmuv3(uptr: u64) -> HwptData {
        HwptData {
            data_type: IOMMU_HWPT_DATA_ARM_SMMUV3,
            len: size_of::<IommuHwptArmSmmuv3>() as u32,
            uptr,
        }
    }
}

/// An array in the caller's memory, as `IOMMU_HWPT_INVALIDATE` takes it: `entry_num`
/// entries of `entry_len` bytes of `data_type` at user address `data_uptr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserArray {
    /// `enum iommu_hwpt_invalidate_data_type`.
    pub data_type: u32,
    /// The bytes of one entry.
    pub entry_len: u32,
    /// How many entries.
    pub entry_num: u32,
    /// Their user address (resolved by the caller).
    pub data_uptr: u64,
}

impl UserArray {
    /// `entry_num` [`IommuHwptVtdS1Invalidate`] entries at `data_uptr`
    /// (`IOMMU_HWPT_INVALIDATE_DATA_VTD_S1`).
    pub const fn vtd_s1(data_uptr: u64, entry_num: u32) -> UserArray {
        UserArray {
            data_type: IOMMU_HWPT_INVALIDATE_DATA_VTD_S1,
            entry_len: size_of::<IommuHwptVtdS1Invalidate>() as u32,
            entry_num,
            data_uptr,
        }
    }

    /// `entry_num` SMMUv3 commands ([`IommuViommuArmSmmuv3Invalidate`]) at `data_uptr`
    /// (`IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3`).
    pub const fn arm_smmuv3(data_uptr: u64, entry_num: u32) -> UserArray {
        UserArray {
            data_type: IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3,
            entry_len: size_of::<IommuViommuArmSmmuv3Invalidate>() as u32,
            entry_num,
            data_uptr,
        }
    }
}

/// The bytes of an array of SMMUv3 commands as `IOMMU_HWPT_INVALIDATE` reads it from a
/// vIOMMU's caller ([`UserArray::arm_smmuv3`]), to be placed in the caller's memory.
pub fn arm_smmuv3_commands(cmds: &[[u64; 2]]) -> Vec<u8> {
    cmds.iter()
        .flat_map(|&cmd| IommuViommuArmSmmuv3Invalidate { cmd }.to_bytes())
        .collect()
}

/// The iommufd ioctls (`include/uapi/linux/iommufd.h`) and the VFIO device cdev calls that
/// join a device to an iommufd (`include/uapi/linux/vfio.h`), typed: one method per ioctl.
/// Each fills `size` (`argsz`) with the size of the structure of [`crate::iommufd`],
/// makes the ioctl through [`UapiFile::ioctl`] and returns what the kernel wrote back.
/// Pointer fields (`user_va`, `data_uptr`) are user addresses the caller resolved through
/// its own memory; no method reads or writes through them. Implemented for every
/// [`UapiFile`] (an iommufd, or a device cdev for the `device_*` calls).
pub trait IommufdIoctls: UapiFile {
    /// `IOMMU_DESTROY` of object `id`.
    fn destroy(&self, id: u32) -> Result<(), Errno> {
        let arg = IommuDestroy {
            size: size_of::<IommuDestroy>() as u32,
            id,
        };
        call(self, IOMMU_DESTROY, &arg).0.map(drop)
    }

    /// `IOMMU_IOAS_ALLOC`: `out_ioas_id`.
    fn ioas_alloc(&self) -> Result<u32, Errno> {
        let arg = IommuIoasAlloc {
            size: size_of::<IommuIoasAlloc>() as u32,
            ..Default::default()
        };
        out(call(self, IOMMU_IOAS_ALLOC, &arg)).map(|a| a.out_ioas_id)
    }

    /// `IOMMU_IOAS_MAP` of `length` bytes of the caller's memory at `user_va`, at `iova`
    /// with `IOMMU_IOAS_MAP_FIXED_IOVA` in `flags`: the IOVA used.
    fn ioas_map(
        &self,
        ioas_id: u32,
        flags: u32,
        user_va: u64,
        length: u64,
        iova: u64,
    ) -> Result<u64, Errno> {
        let arg = IommuIoasMap {
            size: size_of::<IommuIoasMap>() as u32,
            flags,
            ioas_id,
            user_va,
            length,
            iova,
            ..Default::default()
        };
        out(call(self, IOMMU_IOAS_MAP, &arg)).map(|a| a.iova)
    }

    /// `IOMMU_IOAS_MAP_FILE` of `length` bytes of the memfd numbered `fd` from `start`:
    /// the IOVA used.
    fn ioas_map_file(
        &self,
        ioas_id: u32,
        flags: u32,
        fd: i32,
        start: u64,
        length: u64,
        iova: u64,
    ) -> Result<u64, Errno> {
        let arg = IommuIoasMapFile {
            size: size_of::<IommuIoasMapFile>() as u32,
            flags,
            ioas_id,
            fd,
            start,
            length,
            iova,
        };
        out(call(self, IOMMU_IOAS_MAP_FILE, &arg)).map(|a| a.iova)
    }

    /// `IOMMU_IOAS_UNMAP` of `[iova, iova + length)`: the bytes unmapped.
    fn ioas_unmap(&self, ioas_id: u32, iova: u64, length: u64) -> Result<u64, Errno> {
        let arg = IommuIoasUnmap {
            size: size_of::<IommuIoasUnmap>() as u32,
            ioas_id,
            iova,
            length,
        };
        out(call(self, IOMMU_IOAS_UNMAP, &arg)).map(|a| a.length)
    }

    /// `IOMMU_IOAS_COPY` of `[src_iova, src_iova + length)` of `src_ioas_id` into
    /// `dst_ioas_id`, at `dst_iova` with `IOMMU_IOAS_MAP_FIXED_IOVA` in `flags`: the IOVA
    /// used.
    fn ioas_copy(
        &self,
        dst_ioas_id: u32,
        src_ioas_id: u32,
        flags: u32,
        length: u64,
        dst_iova: u64,
        src_iova: u64,
    ) -> Result<u64, Errno> {
        let arg = IommuIoasCopy {
            size: size_of::<IommuIoasCopy>() as u32,
            flags,
            dst_ioas_id,
            src_ioas_id,
            length,
            dst_iova,
            src_iova,
        };
        out(call(self, IOMMU_IOAS_COPY, &arg)).map(|a| a.dst_iova)
    }

    /// `IOMMU_IOAS_IOVA_RANGES` of `ioas_id` with room for `num_iovas` ranges
    /// ([`crate::iommufd::IommuIovaRange`]) at user address `allowed_iovas`: the result
    /// and the structure the kernel wrote back (`num_iovas` the ranges there are, also on
    /// `EMSGSIZE`; `out_iova_alignment`).
    fn ioas_iova_ranges(
        &self,
        ioas_id: u32,
        num_iovas: u32,
        allowed_iovas: u64,
    ) -> (Result<(), Errno>, IommuIoasIovaRanges) {
        let arg = IommuIoasIovaRanges {
            size: size_of::<IommuIoasIovaRanges>() as u32,
            ioas_id,
            num_iovas,
            __reserved: 0,
            allowed_iovas,
            out_iova_alignment: 0,
        };
        let (r, back) = call(self, IOMMU_IOAS_IOVA_RANGES, &arg);
        (r.map(drop), back)
    }

    /// `IOMMU_IOAS_ALLOW_IOVAS` of `ioas_id`: the `num_iovas` ranges
    /// ([`crate::iommufd::IommuIovaRange`]) at user address `allowed_iovas`.
    fn ioas_allow_iovas(
        &self,
        ioas_id: u32,
        num_iovas: u32,
        allowed_iovas: u64,
    ) -> Result<(), Errno> {
        let arg = IommuIoasAllowIovas {
            size: size_of::<IommuIoasAllowIovas>() as u32,
            ioas_id,
            num_iovas,
            __reserved: 0,
            allowed_iovas,
        };
        call(self, IOMMU_IOAS_ALLOW_IOVAS, &arg).0.map(drop)
    }

    /// `IOMMU_HWPT_ALLOC` for device `dev_id` over `pt_id` (an IOAS, a nest parent or a
    /// vIOMMU) with `data`; `fault_id` is read with `IOMMU_HWPT_FAULT_ID_VALID` in
    /// `flags`: `out_hwpt_id`.
    fn hwpt_alloc(
        &self,
        dev_id: u32,
        pt_id: u32,
        flags: u32,
        data: HwptData,
        fault_id: u32,
    ) -> Result<u32, Errno> {
        let arg = IommuHwptAlloc {
            size: size_of::<IommuHwptAlloc>() as u32,
            flags,
            dev_id,
            pt_id,
            data_type: data.data_type,
            data_len: data.len,
            data_uptr: data.uptr,
            fault_id,
            ..Default::default()
        };
        out(call(self, IOMMU_HWPT_ALLOC, &arg)).map(|a| a.out_hwpt_id)
    }

    /// `IOMMU_HWPT_INVALIDATE` of `array` on `hwpt_id` (a nested HWPT, or a vIOMMU): the
    /// number of entries handled, which the kernel writes back to `entry_num` whether it
    /// fails or not (on failure, the index of the entry refused).
    fn hwpt_invalidate(&self, hwpt_id: u32, array: UserArray) -> (Result<(), Errno>, u32) {
        let arg = IommuHwptInvalidate {
            size: size_of::<IommuHwptInvalidate>() as u32,
            hwpt_id,
            data_uptr: array.data_uptr,
            data_type: array.data_type,
            entry_len: array.entry_len,
            entry_num: array.entry_num,
            __reserved: 0,
        };
        let (r, back) = call(self, IOMMU_HWPT_INVALIDATE, &arg);
        (r.map(drop), back.entry_num)
    }

    /// `IOMMU_GET_HW_INFO` of device `dev_id`, its driver data written to `data_len`
    /// bytes at `data_uptr`; `data_type` is read with `IOMMU_HW_INFO_FLAG_INPUT_TYPE` in
    /// `flags`. Returns the structure as the kernel wrote it back (`data_len` the bytes it
    /// filled, `out_data_type`, `out_capabilities`, `out_max_pasid_log2`).
    fn get_hw_info(
        &self,
        dev_id: u32,
        flags: u32,
        data_type: u32,
        data_len: u32,
        data_uptr: u64,
    ) -> Result<IommuHwInfo, Errno> {
        let mut arg = hw_info(size_of::<IommuHwInfo>() as u32, flags, dev_id, data_type);
        arg.data_len = data_len;
        arg.data_uptr = data_uptr;
        out(call(self, IOMMU_GET_HW_INFO, &arg))
    }

    /// `IOMMU_FAULT_QUEUE_ALLOC`: `out_fault_id` and `out_fault_fd` (an fd number of the
    /// process that made the call).
    fn fault_queue_alloc(&self, flags: u32) -> Result<(u32, i32), Errno> {
        let arg = IommuFaultAlloc {
            size: size_of::<IommuFaultAlloc>() as u32,
            flags,
            ..Default::default()
        };
        out(call(self, IOMMU_FAULT_QUEUE_ALLOC, &arg))
            .map(|a| (a.out_fault_id, a.out_fault_fd as i32))
    }

    /// `IOMMU_VIOMMU_ALLOC` of a vIOMMU of `type_` over nest parent `hwpt_id` of device
    /// `dev_id`, without driver data: `out_viommu_id`.
    fn viommu_alloc(&self, dev_id: u32, hwpt_id: u32, type_: u32) -> Result<u32, Errno> {
        let arg = IommuViommuAlloc {
            size: size_of::<IommuViommuAlloc>() as u32,
            type_,
            dev_id,
            hwpt_id,
            ..Default::default()
        };
        out(call(self, IOMMU_VIOMMU_ALLOC, &arg)).map(|a| a.out_viommu_id)
    }

    /// `IOMMU_VDEVICE_ALLOC` of device `dev_id` under `viommu_id` with the guest's ID
    /// `virt_id` (the vSID of an SMMUv3): `out_vdevice_id`.
    fn vdevice_alloc(&self, viommu_id: u32, dev_id: u32, virt_id: u64) -> Result<u32, Errno> {
        let arg = IommuVdeviceAlloc {
            size: size_of::<IommuVdeviceAlloc>() as u32,
            viommu_id,
            dev_id,
            out_vdevice_id: 0,
            virt_id,
        };
        out(call(self, IOMMU_VDEVICE_ALLOC, &arg)).map(|a| a.out_vdevice_id)
    }

    /// `IOMMU_VEVENTQ_ALLOC` of a vEVENT queue of `type_` and `depth` on `viommu_id`:
    /// `out_veventq_id` and `out_veventq_fd` (an fd number of the calling process).
    fn veventq_alloc(&self, viommu_id: u32, type_: u32, depth: u32) -> Result<(u32, i32), Errno> {
        let arg = IommuVeventqAlloc {
            size: size_of::<IommuVeventqAlloc>() as u32,
            viommu_id,
            type_,
            veventq_depth: depth,
            ..Default::default()
        };
        out(call(self, IOMMU_VEVENTQ_ALLOC, &arg))
            .map(|a| (a.out_veventq_id, a.out_veventq_fd as i32))
    }

    /// `VFIO_DEVICE_BIND_IOMMUFD` of this device cdev to the iommufd numbered `iommufd`:
    /// `out_devid`.
    fn device_bind_iommufd(&self, iommufd: i32) -> Result<u32, Errno> {
        let arg = VfioDeviceBindIommufd {
            argsz: size_of::<VfioDeviceBindIommufd>() as u32,
            flags: 0,
            iommufd,
            out_devid: 0,
            token_uuid_ptr: 0,
        };
        out(call(self, VFIO_DEVICE_BIND_IOMMUFD, &arg)).map(|a| a.out_devid)
    }

    /// `VFIO_DEVICE_ATTACH_IOMMUFD_PT` of the device's RID (`pasid` `None`), or of a PASID
    /// (`VFIO_DEVICE_ATTACH_PASID`), to `pt_id`: the `pt_id` the kernel wrote back (the
    /// HWPT it attached when `pt_id` is an IOAS).
    fn device_attach_pt(&self, pt_id: u32, pasid: Option<u32>) -> Result<u32, Errno> {
        let arg = VfioDeviceAttachIommufdPt {
            argsz: size_of::<VfioDeviceAttachIommufdPt>() as u32,
            flags: pasid.map_or(0, |_| VFIO_DEVICE_ATTACH_PASID),
            pt_id,
            pasid: pasid.unwrap_or(0),
        };
        out(call(self, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &arg)).map(|a| a.pt_id)
    }

    /// `VFIO_DEVICE_DETACH_IOMMUFD_PT` of the device's RID (`pasid` `None`), or of a PASID
    /// (`VFIO_DEVICE_DETACH_PASID`).
    fn device_detach_pt(&self, pasid: Option<u32>) -> Result<(), Errno> {
        let arg = VfioDeviceDetachIommufdPt {
            argsz: size_of::<VfioDeviceDetachIommufdPt>() as u32,
            flags: pasid.map_or(0, |_| VFIO_DEVICE_DETACH_PASID),
            pasid: pasid.unwrap_or(0),
        };
        call(self, VFIO_DEVICE_DETACH_IOMMUFD_PT, &arg).0.map(drop)
    }
}

impl<F: UapiFile + ?Sized> IommufdIoctls for F {}

/// One ioctl with `arg` in: its result, and the structure as the kernel left it.
fn call<F: UapiFile + ?Sized, T: Wire>(file: &F, cmd: u32, arg: &T) -> (Result<usize, Errno>, T) {
    let mut bytes = arg.to_bytes();
    let r = file.ioctl(cmd, &mut bytes);
    (r, T::read(&bytes))
}

/// What the kernel wrote back, when the ioctl succeeded.
fn out<T>((r, back): (Result<usize, Errno>, T)) -> Result<T, Errno> {
    r.map(|_| back)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::iommufd::*;

    /// A file that keeps every ioctl's argument and answers with `reply`: the bytes it
    /// writes over the argument's first bytes, and the result.
    struct Recorder {
        calls: Mutex<Vec<(u32, Vec<u8>)>>,
        reply: (Vec<u8>, Result<usize, Errno>),
    }

    impl Recorder {
        fn new(reply: Vec<u8>, r: Result<usize, Errno>) -> Recorder {
            Recorder {
                calls: Mutex::new(Vec::new()),
                reply: (reply, r),
            }
        }

        fn last(&self) -> (u32, Vec<u8>) {
            self.calls.lock().unwrap().last().cloned().unwrap()
        }
    }

    impl UapiFile for Recorder {
        fn ioctl(&self, cmd: u32, arg: &mut [u8]) -> Result<usize, Errno> {
            self.calls.lock().unwrap().push((cmd, arg.to_vec()));
            let n = self.reply.0.len().min(arg.len());
            arg[..n].copy_from_slice(&self.reply.0[..n]);
            self.reply.1
        }
        fn read(&self, _: &mut [u8]) -> Result<usize, Errno> {
            Err(Errno::EINVAL)
        }
        fn write(&self, _: &[u8]) -> Result<usize, Errno> {
            Err(Errno::EINVAL)
        }
        fn set_event_notifier(&self, _: Option<Arc<dyn EventNotifier>>) {}
    }

    #[test]
    fn each_iommufd_call_passes_the_kernel_structure_and_reads_its_out_field() {
        let f = Recorder::new(Vec::new(), Ok(0));
        let echo = |out: Vec<u8>| Recorder::new(out, Ok(0));
        // IOAS map: fields where iommufd.h puts them, size = sizeof.
        f.ioas_map(3, IOMMU_IOAS_MAP_READABLE, 0x7000, 0x2000, 0x4000)
            .unwrap();
        let map = IommuIoasMap {
            size: 40,
            flags: IOMMU_IOAS_MAP_READABLE,
            ioas_id: 3,
            user_va: 0x7000,
            length: 0x2000,
            iova: 0x4000,
            ..Default::default()
        };
        assert_eq!(f.last(), (IOMMU_IOAS_MAP, map.to_bytes()));
        f.hwpt_alloc(5, 9, IOMMU_HWPT_FAULT_ID_VALID, HwptData::vtd_s1(0x1234), 7)
            .unwrap();
        let (cmd, bytes) = f.last();
        let a = IommuHwptAlloc::read(&bytes);
        assert_eq!(cmd, IOMMU_HWPT_ALLOC);
        assert_eq!(
            (a.size, a.flags, a.dev_id, a.pt_id, a.fault_id),
            (48, IOMMU_HWPT_FAULT_ID_VALID, 5, 9, 7)
        );
        assert_eq!(
            (a.data_type, a.data_len, a.data_uptr),
            (IOMMU_HWPT_DATA_VTD_S1, 24, 0x1234)
        );
        f.device_attach_pt(4, Some(2)).unwrap();
        let (cmd, bytes) = f.last();
        assert_eq!(cmd, VFIO_DEVICE_ATTACH_IOMMUFD_PT);
        assert_eq!(
            VfioDeviceAttachIommufdPt::read(&bytes),
            VfioDeviceAttachIommufdPt {
                argsz: 16,
                flags: VFIO_DEVICE_ATTACH_PASID,
                pt_id: 4,
                pasid: 2
            }
        );
        f.device_detach_pt(None).unwrap();
        assert_eq!(
            f.last(),
            (
                VFIO_DEVICE_DETACH_IOMMUFD_PT,
                VfioDeviceDetachIommufdPt {
                    argsz: 12,
                    flags: 0,
                    pasid: 0
                }
                .to_bytes()
            )
        );
        // Out fields come from what the kernel wrote back.
        let ioas = IommuIoasAlloc {
            out_ioas_id: 11,
            ..Default::default()
        };
        assert_eq!(echo(ioas.to_bytes()).ioas_alloc(), Ok(11));
        let q = IommuVeventqAlloc {
            out_veventq_id: 6,
            out_veventq_fd: 40,
            ..Default::default()
        };
        assert_eq!(echo(q.to_bytes()).veventq_alloc(1, 1, 8), Ok((6, 40)));
        let v = IommuVdeviceAlloc {
            out_vdevice_id: 12,
            ..Default::default()
        };
        assert_eq!(echo(v.to_bytes()).vdevice_alloc(1, 2, 0x99), Ok(12));
    }

    #[test]
    fn a_refused_call_is_its_errno_and_invalidate_reports_the_entry_refused() {
        let back = IommuHwptInvalidate {
            entry_num: 2,
            ..Default::default()
        };
        let f = Recorder::new(back.to_bytes(), Err(Errno::EINVAL));
        let array = UserArray::arm_smmuv3(0x8000, 5);
        assert_eq!(
            (array.data_type, array.entry_len),
            (IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3, 16)
        );
        assert_eq!(UserArray::vtd_s1(0, 1).entry_len, 24);
        assert_eq!(f.hwpt_invalidate(8, array), (Err(Errno::EINVAL), 2));
        let (cmd, bytes) = f.last();
        assert_eq!(cmd, IOMMU_HWPT_INVALIDATE);
        let sent = IommuHwptInvalidate::read(&bytes);
        assert_eq!(
            (sent.size, sent.hwpt_id, sent.entry_num, sent.entry_len),
            (32, 8, 5, 16)
        );
        assert_eq!((sent.data_uptr, sent.data_type), (0x8000, array.data_type));
        // Commands as the kernel reads them: two little-endian words each.
        let bytes = arm_smmuv3_commands(&[[1, 2], [3, 4]]);
        let words: Vec<u64> = bytes
            .chunks(8)
            .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
            .collect();
        assert_eq!(words, [1, 2, 3, 4]);
        // An out field is not taken from a failed call.
        let f = Recorder::new(
            IommuIoasAlloc {
                out_ioas_id: 3,
                ..Default::default()
            }
            .to_bytes(),
            Err(Errno::ENOMEM),
        );
        assert_eq!(f.ioas_alloc(), Err(Errno::ENOMEM));
        assert_eq!(f.destroy(3), Err(Errno::ENOMEM));
    }
}
