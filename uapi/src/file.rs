//! The kernel as a VMM sees it: an open file. [`UapiFile`] is the one boundary between a
//! VMM and the host: `ioctl` on argument bytes, `read`/`write` of the fault queue, and an
//! event notifier for "there is something to read". The host's container implements it
//! in-process; a socket transport or the iommufd uAPI can implement it later.
//!
//! [`VfioIoctls`] holds the typed wrappers, one method per container ioctl (struct in,
//! struct out, as rust-vmm's `vfio-ioctls` does): each encodes its argument, makes the
//! ioctl and decodes what the kernel wrote back.

use std::mem::size_of;
use std::sync::Arc;

use vsva_vtd::{addr::Iova, addr::Pasid, addr::SourceId};

use crate::error::{Errno, UapiError};
use crate::iommu::{IommuCacheInvalidateInfo, IommuGpasidBindData, IommuPageResponse};
use crate::request::{
    BindGpasid, CacheInvalidate, DmaMap, NestingInfo, PageResponse, PasidTableConfig, QueuedFault,
};
use crate::vfio::*;
use crate::wire::read_prefix;

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
        const RECORD: usize = size_of::<VfioIommuType1Fault>();
        let mut out = Vec::new();
        let mut buf = [0u8; RECORD * 16];
        loop {
            let n = match self.read(&mut buf) {
                Ok(n) => n,
                Err(Errno::EAGAIN) => return Ok(out),
                Err(e) => return Err(e),
            };
            for rec in buf[..n].chunks_exact(RECORD) {
                let r = VfioIommuType1Fault::from_bytes(rec).map_err(|e| Errno::from(&e))?;
                out.push(QueuedFault::try_from(&r).map_err(|e| Errno::from(&e))?);
            }
            if n < buf.len() {
                return Ok(out);
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
        let mut buf = VfioIommuType1CacheInvalidate {
            argsz: size_of::<VfioIommuType1CacheInvalidate>() as u32,
            flags: 0,
            info: IommuCacheInvalidateInfo::from(inv),
        }
        .to_bytes();
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
    let mut buf = VfioIommuType1PasidRequest {
        argsz: size_of::<VfioIommuType1PasidRequest>() as u32,
        flags,
        range: VfioPasidRange { min, max },
    }
    .to_bytes();
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
pub fn page_response_bytes(sid: Option<SourceId>, resp: &PageResponse) -> Vec<u8> {
    VfioIommuType1PageResponse {
        argsz: size_of::<VfioIommuType1PageResponse>() as u32,
        flags: sid.map_or(0, |_| VFIO_IOMMU_PAGE_RESPONSE_RID_VALID),
        rid: sid.map_or(0, |s| s.rid().into()),
        response: IommuPageResponse::from(resp),
    }
    .to_bytes()
}
