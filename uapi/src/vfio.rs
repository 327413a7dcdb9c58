//! The VFIO container ioctls: `include/uapi/linux/vfio.h` of Linux v5.10 (type1 IOMMU part)
//! and the seed series' additions.
//!
//! Numbering: every container ioctl is `_IO(VFIO_TYPE, VFIO_BASE + n)`. The SVA ioctls use
//! the seed series' numbers (RFC v1, July 2019): ATTACH/DETACH_PASID_TABLE 22/23,
//! CACHE_INVALIDATE 24, PASID_REQUEST 27, BIND/UNBIND 28/29.
//!
//! Layout choices where the seed and later postings differ:
//! - `vfio_iommu_type1_pasid_request` follows v5/v6 of "vfio: expose virtual Shared Virtual
//!   Addressing to VMs" (`flags` with `VFIO_IOMMU_FLAG_ALLOC_PASID`/`FREE_PASID` and a
//!   `range { min, max }`); the seed's `{ int min_pasid, max_pasid } | int pasid` union has
//!   the same 16-byte image, a single-PASID free being `min == max`.
//! - `vfio_iommu_type1_bind` is the seed's `{ argsz, bind_type, data[] }` with `data` an
//!   `iommu_gpasid_bind_data` of v5.10 (which carries its own `argsz`).
//! - `vfio_iommu_type1_cache_invalidate` wraps the v5.10 `iommu_cache_invalidate_info`,
//!   whose own `argsz` decides how much of it is read (as v7 of the series hands the user
//!   pointer past the VFIO header to `iommu_uapi_cache_invalidate`).
//! - The nesting capability (`VFIO_IOMMU_TYPE1_INFO_CAP_NESTING` = 3, carrying
//!   `iommu_nesting_info`) follows v7 of the series; the seed had none.
//!
//! vsva extension: the seed series has no way to answer a page request.
//! `VFIO_IOMMU_PAGE_RESPONSE` (`VFIO_BASE + 64`, a number no VFIO ioctl of any version or
//! posting uses) takes `vfio_iommu_type1_page_response`: a VFIO header, the requester id
//! of the device, and a v5.10 `iommu_page_response`, which upstream later carried through
//! VFIO's per-device DMA fault response region instead.

use std::mem::{offset_of, size_of};

use super::iommu::{
    IommuCacheInvalidateInfo, IommuFault, IommuGpasidBindData, IommuNestingInfo, IommuPageResponse,
    IommuPasidTableConfig, PAGE_SIZE,
};
use super::wire::{check_argsz, check_flags, peek_u32, read_with_argsz, wire_fields};
pub use super::wire::{FromBytes, Wire};
use crate::error::UapiError;
use crate::wire::c_struct;
use vfio_bindings::bindings::vfio::{
    vfio_info_cap_header, vfio_iommu_type1_dma_map, vfio_iommu_type1_dma_unmap,
    vfio_iommu_type1_info,
};

/// `VFIO_TYPE`: the ioctl type byte, `';'`.
pub const VFIO_TYPE: u32 = b';' as u32;
/// `VFIO_BASE`: the first VFIO ioctl number.
pub const VFIO_BASE: u32 = 100;

/// `_IO(type, nr)`: an ioctl number without direction or size bits.
pub const fn io(ty: u32, nr: u32) -> u32 {
    (ty << 8) | nr
}

/// `VFIO_API_VERSION`, answered by `VFIO_GET_API_VERSION`.
pub const VFIO_API_VERSION: u32 = 0;

/// `VFIO_GET_API_VERSION`: no argument; returns `VFIO_API_VERSION`.
pub const VFIO_GET_API_VERSION: u32 = io(VFIO_TYPE, VFIO_BASE);
/// `VFIO_CHECK_EXTENSION`: integer argument (an extension id); returns 1 if supported.
pub const VFIO_CHECK_EXTENSION: u32 = io(VFIO_TYPE, VFIO_BASE + 1);
/// `VFIO_SET_IOMMU`: integer argument (an IOMMU model id).
pub const VFIO_SET_IOMMU: u32 = io(VFIO_TYPE, VFIO_BASE + 2);
/// `VFIO_IOMMU_GET_INFO`: `struct vfio_iommu_type1_info` (+ capability chain).
pub const VFIO_IOMMU_GET_INFO: u32 = io(VFIO_TYPE, VFIO_BASE + 12);
/// `VFIO_IOMMU_MAP_DMA`: `struct vfio_iommu_type1_dma_map`.
pub const VFIO_IOMMU_MAP_DMA: u32 = io(VFIO_TYPE, VFIO_BASE + 13);
/// `VFIO_IOMMU_UNMAP_DMA`: `struct vfio_iommu_type1_dma_unmap`; `size` returns the bytes
/// unmapped.
pub const VFIO_IOMMU_UNMAP_DMA: u32 = io(VFIO_TYPE, VFIO_BASE + 14);
/// `VFIO_IOMMU_ATTACH_PASID_TABLE` (seed): `struct vfio_iommu_type1_attach_pasid_table`.
pub const VFIO_IOMMU_ATTACH_PASID_TABLE: u32 = io(VFIO_TYPE, VFIO_BASE + 22);
/// `VFIO_IOMMU_DETACH_PASID_TABLE` (seed): no argument.
pub const VFIO_IOMMU_DETACH_PASID_TABLE: u32 = io(VFIO_TYPE, VFIO_BASE + 23);
/// `VFIO_IOMMU_CACHE_INVALIDATE` (seed): `struct vfio_iommu_type1_cache_invalidate`.
pub const VFIO_IOMMU_CACHE_INVALIDATE: u32 = io(VFIO_TYPE, VFIO_BASE + 24);
/// `VFIO_IOMMU_PASID_REQUEST` (seed): `struct vfio_iommu_type1_pasid_request`; returns the
/// PASID allocated, or 0 for a free.
pub const VFIO_IOMMU_PASID_REQUEST: u32 = io(VFIO_TYPE, VFIO_BASE + 27);
/// `VFIO_IOMMU_BIND` (seed): `struct vfio_iommu_type1_bind` + bind data.
pub const VFIO_IOMMU_BIND: u32 = io(VFIO_TYPE, VFIO_BASE + 28);
/// `VFIO_IOMMU_UNBIND` (seed): `struct vfio_iommu_type1_bind` + bind data.
pub const VFIO_IOMMU_UNBIND: u32 = io(VFIO_TYPE, VFIO_BASE + 29);

/// `VFIO_IOMMU_PAGE_RESPONSE` (vsva extension): `struct vfio_iommu_type1_page_response`.
pub const VFIO_IOMMU_PAGE_RESPONSE: u32 = io(VFIO_TYPE, VFIO_BASE + 64);

/// `VFIO_TYPE1_IOMMU`: type1 with v1 unmap semantics (not offered here).
pub const VFIO_TYPE1_IOMMU: u64 = 1;
/// `VFIO_TYPE1v2_IOMMU`: type1, unmaps may not split mappings.
pub const VFIO_TYPE1V2_IOMMU: u64 = 3;
/// `VFIO_TYPE1_NESTING_IOMMU`: type1 v2 whose IOMMU does nested translation: MAP_DMA fills
/// the second level, the SVA ioctls manage the first.
pub const VFIO_TYPE1_NESTING_IOMMU: u64 = 6;

/// `VFIO_IOMMU_INFO_PGSIZES`: `iova_pgsizes` is valid.
pub const VFIO_IOMMU_INFO_PGSIZES: u32 = 1 << 0;
/// `VFIO_IOMMU_INFO_CAPS`: a capability chain follows; `cap_offset` points at it.
pub const VFIO_IOMMU_INFO_CAPS: u32 = 1 << 1;
/// `VFIO_IOMMU_TYPE1_INFO_CAP_NESTING`: the nesting capability id.
pub const VFIO_IOMMU_TYPE1_INFO_CAP_NESTING: u16 = 3;
/// Version of the nesting capability.
pub const VFIO_IOMMU_TYPE1_INFO_CAP_NESTING_VERSION: u16 = 1;

/// `VFIO_DMA_MAP_FLAG_READ`: readable from the device.
pub const VFIO_DMA_MAP_FLAG_READ: u32 = 1 << 0;
/// `VFIO_DMA_MAP_FLAG_WRITE`: writable from the device.
pub const VFIO_DMA_MAP_FLAG_WRITE: u32 = 1 << 1;
/// `VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP` (v5.10): defined, but dirty tracking is not
/// offered, so it is refused like an unknown flag.
pub const VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP: u32 = 1 << 0;

/// `VFIO_IOMMU_FLAG_ALLOC_PASID`: allocate one PASID within the range.
pub const VFIO_IOMMU_FLAG_ALLOC_PASID: u32 = 1 << 0;
/// `VFIO_IOMMU_FLAG_FREE_PASID`: free the caller's PASIDs within the range.
pub const VFIO_IOMMU_FLAG_FREE_PASID: u32 = 1 << 1;
/// `VFIO_PASID_REQUEST_MASK`.
pub const VFIO_PASID_REQUEST_MASK: u32 = VFIO_IOMMU_FLAG_ALLOC_PASID | VFIO_IOMMU_FLAG_FREE_PASID;

/// `VFIO_IOMMU_PAGE_RESPONSE_RID_VALID` (vsva extension): `rid` names the device the
/// response goes to; without it, the oldest pending group that matches is answered.
pub const VFIO_IOMMU_PAGE_RESPONSE_RID_VALID: u32 = 1 << 0;

/// `VFIO_IOMMU_BIND_PROCESS` (seed's `enum vfio_iommu_bind_type`): bind a host process;
/// defined but not supported.
pub const VFIO_IOMMU_BIND_PROCESS: u32 = 0;
/// `VFIO_IOMMU_BIND_GUEST_PASID`: bind a guest page table; data is `iommu_gpasid_bind_data`.
pub const VFIO_IOMMU_BIND_GUEST_PASID: u32 = 1;

/// `struct vfio_info_cap_header` (from `vfio-bindings`): the head of each capability in
/// a chain (`id`, `version`, `next`: offset of the next capability from the start of the
/// info structure, 0 ends).
pub type VfioInfoCapHeader = vfio_info_cap_header;
wire_fields!(VfioInfoCapHeader {
    id: u16,
    version: u16,
    next: u32
});

/// `struct vfio_iommu_type1_info` (from `vfio-bindings`): all fields but `argsz` are written
/// by the kernel; `pad` is the explicit tail padding later headers name.
pub type VfioIommuType1Info = vfio_iommu_type1_info;
wire_fields!(VfioIommuType1Info {
    argsz: u32,
    flags: u32,
    iova_pgsizes: u64,
    cap_offset: u32,
    pad: u32
});

impl FromBytes for VfioIommuType1Info {
    /// Decodes the caller's request: `argsz` must reach `iova_pgsizes` (the v5.10 `minsz`).
    /// The other fields are outputs and are not checked.
    fn from_bytes(bytes: &[u8]) -> Result<Self, UapiError> {
        read_with_argsz(
            bytes,
            offset_of!(Self, iova_pgsizes) + size_of::<u64>(),
            "vfio_iommu_type1_info",
        )
    }
}
/// `struct vfio_iommu_type1_info_cap_nesting`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct VfioIommuType1InfoCapNesting {
    /// `id` = `VFIO_IOMMU_TYPE1_INFO_CAP_NESTING`.
    pub header: VfioInfoCapHeader,
    /// The host IOMMU's nesting information.
    pub info: IommuNestingInfo,
}
wire_fields!(VfioIommuType1InfoCapNesting {
    header: VfioInfoCapHeader,
    info: IommuNestingInfo
});

impl VfioIommuType1InfoCapNesting {
    /// Decodes the capability (header id and version checked) and validates its info.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, UapiError> {
        const WHAT: &str = "vfio_iommu_type1_info_cap_nesting";
        if bytes.len() < size_of::<Self>() {
            return Err(UapiError::BufferTooShort {
                what: WHAT,
                len: bytes.len(),
                need: size_of::<Self>(),
            });
        }
        let cap: Self = super::wire::read_prefix(bytes, size_of::<Self>());
        if cap.header.id != VFIO_IOMMU_TYPE1_INFO_CAP_NESTING {
            return Err(UapiError::field(
                WHAT,
                format!("capability id {} is not NESTING", cap.header.id),
            ));
        }
        if cap.header.version != VFIO_IOMMU_TYPE1_INFO_CAP_NESTING_VERSION {
            return Err(UapiError::BadVersion {
                what: WHAT,
                version: cap.header.version.into(),
                expected: VFIO_IOMMU_TYPE1_INFO_CAP_NESTING_VERSION.into(),
            });
        }
        IommuNestingInfo::from_bytes(&bytes[offset_of!(Self, info)..])?;
        Ok(cap)
    }
}

/// Checks a DMA range: non-empty, 4 KiB aligned, not wrapping.
fn check_dma_range(iova: u64, size: u64, what: &'static str) -> Result<(), UapiError> {
    if size == 0 {
        return Err(UapiError::field(what, "size is zero"));
    }
    if (iova | size) % PAGE_SIZE != 0 {
        return Err(UapiError::field(
            what,
            format!("iova {iova:#x} or size {size:#x} is not 4 KiB aligned"),
        ));
    }
    if iova.checked_add(size - 1).is_none() {
        return Err(UapiError::field(
            what,
            format!("iova {iova:#x} + size {size:#x} wraps"),
        ));
    }
    Ok(())
}

/// `struct vfio_iommu_type1_dma_map` (from `vfio-bindings`): map `size` bytes of process
/// memory at `vaddr` to `iova` with `VFIO_DMA_MAP_FLAG_*` rights.
pub type VfioIommuType1DmaMap = vfio_iommu_type1_dma_map;
wire_fields!(VfioIommuType1DmaMap {
    argsz: u32,
    flags: u32,
    vaddr: u64,
    iova: u64,
    size: u64
});

impl FromBytes for VfioIommuType1DmaMap {
    /// Decodes and validates as v5.10 `vfio_dma_do_map`: whole structure, known flags, READ
    /// or WRITE, non-empty 4 KiB-aligned ranges that do not wrap.
    fn from_bytes(bytes: &[u8]) -> Result<Self, UapiError> {
        const WHAT: &str = "vfio_iommu_type1_dma_map";
        let m: Self = read_with_argsz(bytes, size_of::<Self>(), WHAT)?;
        check_flags(
            m.flags.into(),
            (VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE).into(),
            WHAT,
        )?;
        if m.flags == 0 {
            return Err(UapiError::field(WHAT, "neither READ nor WRITE"));
        }
        check_dma_range(m.iova, m.size, WHAT)?;
        if m.vaddr % PAGE_SIZE != 0 || m.vaddr.checked_add(m.size - 1).is_none() {
            return Err(UapiError::field(
                WHAT,
                format!("vaddr {:#x} is misaligned or wraps", m.vaddr),
            ));
        }
        Ok(m)
    }
}

/// `struct vfio_iommu_type1_dma_unmap` (from `vfio-bindings`): unmap `size` bytes at
/// `iova`; `size` returns the bytes unmapped. The `data[]` tail is only used with the
/// dirty-bitmap flag, which is refused.
pub type VfioIommuType1DmaUnmap = vfio_iommu_type1_dma_unmap;
wire_fields!(VfioIommuType1DmaUnmap {
    argsz: u32,
    flags: u32,
    iova: u64,
    size: u64
} data: vfio_bindings::bindings::vfio::__IncompleteArrayField::new());

impl FromBytes for VfioIommuType1DmaUnmap {
    /// Decodes and validates as v5.10 `vfio_dma_do_unmap`: whole structure, no flags (no
    /// dirty tracking here), a non-empty 4 KiB-aligned range that does not wrap.
    fn from_bytes(bytes: &[u8]) -> Result<Self, UapiError> {
        const WHAT: &str = "vfio_iommu_type1_dma_unmap";
        let u: Self = read_with_argsz(bytes, size_of::<Self>(), WHAT)?;
        check_flags(u.flags.into(), 0, WHAT)?;
        check_dma_range(u.iova, u.size, WHAT)?;
        Ok(u)
    }
}

c_struct! {
    /// The `range` member of `vfio_iommu_type1_pasid_request`.
    pub struct VfioPasidRange {
        /// Lowest PASID, inclusive.
        pub min: u32,
        /// Highest PASID, inclusive.
        pub max: u32,
    }
}

c_struct! {
    /// `struct vfio_iommu_type1_pasid_request`: allocate or free PASIDs.
    pub struct VfioIommuType1PasidRequest {
        /// User-filled size.
        pub argsz: u32,
        /// Exactly one of `VFIO_IOMMU_FLAG_ALLOC_PASID`, `VFIO_IOMMU_FLAG_FREE_PASID`.
        pub flags: u32,
        /// The PASID range.
        pub range: VfioPasidRange,
    }
}

impl VfioIommuType1PasidRequest {
    /// Decodes and validates: whole structure, exactly one of ALLOC and FREE, a range with
    /// `min <= max <= 0xfffff`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, UapiError> {
        const WHAT: &str = "vfio_iommu_type1_pasid_request";
        let r: Self = read_with_argsz(bytes, size_of::<Self>(), WHAT)?;
        check_flags(r.flags.into(), VFIO_PASID_REQUEST_MASK.into(), WHAT)?;
        if r.flags.count_ones() != 1 {
            return Err(UapiError::field(
                WHAT,
                "exactly one of ALLOC_PASID and FREE_PASID is required",
            ));
        }
        if r.range.min > r.range.max || r.range.max > vsva_vtd::addr::Pasid::MAX.raw() {
            return Err(UapiError::BadPasidRange {
                min: r.range.min,
                max: r.range.max,
            });
        }
        Ok(r)
    }
}

c_struct! {
    /// `struct vfio_iommu_type1_bind` (seed): a header followed by `data[]`.
    pub struct VfioIommuType1Bind {
        /// User-filled size, header and data together.
        pub argsz: u32,
        /// `VFIO_IOMMU_BIND_*` (the seed's C enum, 4 bytes).
        pub bind_type: u32,
    }
}

/// A decoded `VFIO_IOMMU_BIND`/`UNBIND` argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VfioBindGuestPasid {
    /// The header.
    pub header: VfioIommuType1Bind,
    /// The bind data in `data[]`.
    pub data: IommuGpasidBindData,
}

impl VfioBindGuestPasid {
    /// Decodes the header (`argsz` covering it, else EINVAL), refuses bind types other than
    /// `VFIO_IOMMU_BIND_GUEST_PASID` with EINVAL as the seed does, then decodes the bind data
    /// from `data[]`, whose own `argsz` must fit inside the header's.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, UapiError> {
        const WHAT: &str = "vfio_iommu_type1_bind";
        let header: VfioIommuType1Bind =
            read_with_argsz(bytes, size_of::<VfioIommuType1Bind>(), WHAT)?;
        if header.bind_type != VFIO_IOMMU_BIND_GUEST_PASID {
            return Err(UapiError::UnsupportedBindType(header.bind_type));
        }
        let data = inner(bytes, header.argsz, size_of::<VfioIommuType1Bind>(), WHAT)?;
        Ok(VfioBindGuestPasid {
            header,
            data: IommuGpasidBindData::from_bytes(data)?,
        })
    }

    /// Bytes of the argument: the header and the bind data in `data[]`.
    pub const SIZE: usize = size_of::<VfioIommuType1Bind>() + size_of::<IommuGpasidBindData>();

    /// The argument bytes: header, then the bind data (on the stack).
    pub fn to_bytes(self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        let (header, data) = out.split_at_mut(size_of::<VfioIommuType1Bind>());
        self.header.write(header);
        self.data.write(data);
        out
    }
}

/// The bytes of an embedded structure that starts at `offset` and carries its own `argsz`,
/// which must fit inside the outer `argsz` (EINVAL) and the buffer (EFAULT).
fn inner<'a>(
    bytes: &'a [u8],
    outer_argsz: u32,
    offset: usize,
    what: &'static str,
) -> Result<&'a [u8], UapiError> {
    let tail = bytes.get(offset..).unwrap_or(&[]);
    let inner_argsz = super::wire::peek_u32(tail, 0, what)?;
    let end = offset as u64 + u64::from(inner_argsz);
    if end > u64::from(outer_argsz) {
        return Err(UapiError::field(
            what,
            format!("embedded argsz {inner_argsz} runs past the outer argsz {outer_argsz}"),
        ));
    }
    Ok(tail)
}

c_struct! {
    /// `struct vfio_iommu_type1_cache_invalidate` (seed), with the v5.10 info.
    pub struct VfioIommuType1CacheInvalidate {
        /// User-filled size.
        pub argsz: u32,
        /// Reserved, zero.
        pub flags: u32,
        /// The invalidation.
        pub info: IommuCacheInvalidateInfo,
    }
}

impl VfioIommuType1CacheInvalidate {
    /// Decodes: `argsz` reaching the info's fixed part, zero `flags` (the seed refuses any),
    /// then the info by its own `argsz`, which must fit inside the outer one.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, UapiError> {
        const WHAT: &str = "vfio_iommu_type1_cache_invalidate";
        let info_at = offset_of!(Self, info);
        let minsz = info_at + offset_of!(IommuCacheInvalidateInfo, granu);
        // The header alone: the info is read once, by its own `argsz`.
        check_argsz(bytes, minsz, size_of::<Self>(), WHAT)?;
        let argsz = peek_u32(bytes, offset_of!(Self, argsz), WHAT)?;
        let flags = peek_u32(bytes, offset_of!(Self, flags), WHAT)?;
        check_flags(flags.into(), 0, WHAT)?;
        let info = IommuCacheInvalidateInfo::from_bytes(inner(bytes, argsz, info_at, WHAT)?)?;
        Ok(VfioIommuType1CacheInvalidate { argsz, flags, info })
    }
}

c_struct! {
    /// `struct vfio_iommu_type1_attach_pasid_table` (seed).
    pub struct VfioIommuType1AttachPasidTable {
        /// User-filled size.
        pub argsz: u32,
        /// Reserved, zero.
        pub flags: u32,
        /// The guest PASID table.
        pub config: IommuPasidTableConfig,
    }
}

impl VfioIommuType1AttachPasidTable {
    /// Decodes as the seed does (`argsz` covering `config`, zero `flags`), then validates the
    /// config.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, UapiError> {
        const WHAT: &str = "vfio_iommu_type1_attach_pasid_table";
        let a: Self = read_with_argsz(bytes, size_of::<Self>(), WHAT)?;
        check_flags(a.flags.into(), 0, WHAT)?;
        IommuPasidTableConfig::from_bytes(&bytes[offset_of!(Self, config)..])?;
        Ok(a)
    }
}

c_struct! {
    /// `struct vfio_iommu_type1_page_response` (vsva extension): a page group response.
    pub struct VfioIommuType1PageResponse {
        /// User-filled size.
        pub argsz: u32,
        /// `VFIO_IOMMU_PAGE_RESPONSE_RID_VALID`.
        pub flags: u32,
        /// Requester id of the device (bits 15:0), when `flags` says so; zero otherwise.
        pub rid: u32,
        /// The response, with its own `argsz`.
        pub response: IommuPageResponse,
    }
}

impl VfioIommuType1PageResponse {
    /// Decodes: whole header, known `flags`, a 16-bit `rid` that is zero unless valid, then
    /// the response by its own `argsz`, which must fit inside the outer one.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, UapiError> {
        const WHAT: &str = "vfio_iommu_type1_page_response";
        let at = offset_of!(Self, response);
        let outer: Self = read_with_argsz(bytes, at, WHAT)?;
        check_flags(
            outer.flags.into(),
            VFIO_IOMMU_PAGE_RESPONSE_RID_VALID.into(),
            WHAT,
        )?;
        let rid_limit = if outer.flags & VFIO_IOMMU_PAGE_RESPONSE_RID_VALID != 0 {
            u16::MAX.into()
        } else {
            0
        };
        if outer.rid > rid_limit {
            return Err(UapiError::field(
                WHAT,
                format!("rid {:#x} is out of range or not flagged valid", outer.rid),
            ));
        }
        let response = IommuPageResponse::from_bytes(inner(bytes, outer.argsz, at, WHAT)?)?;
        Ok(VfioIommuType1PageResponse { response, ..outer })
    }
}

c_struct! {
    /// `struct vfio_iommu_type1_fault` (vsva extension): one record `read` from the
    /// container file's fault queue: the requester id of the device and its `iommu_fault`.
    pub struct VfioIommuType1Fault {
        /// `VFIO_IOMMU_FAULT_RID_VALID`.
        pub flags: u32,
        /// Requester id of the device (bits 15:0).
        pub rid: u32,
        /// The fault.
        pub fault: IommuFault,
    }
}

/// `VFIO_IOMMU_FAULT_RID_VALID` (vsva extension): `rid` names the reporting device.
pub const VFIO_IOMMU_FAULT_RID_VALID: u32 = 1 << 0;

impl VfioIommuType1Fault {
    /// Decodes a record: known `flags`, a 16-bit `rid` flagged valid, a valid fault.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, UapiError> {
        const WHAT: &str = "vfio_iommu_type1_fault";
        if bytes.len() < size_of::<Self>() {
            return Err(UapiError::BufferTooShort {
                what: WHAT,
                len: bytes.len(),
                need: size_of::<Self>(),
            });
        }
        let r: Self = super::wire::read_prefix(bytes, size_of::<Self>());
        if r.flags != VFIO_IOMMU_FAULT_RID_VALID || r.rid > u16::MAX.into() {
            return Err(UapiError::field(
                WHAT,
                format!("flags {:#x} or rid {:#x} out of range", r.flags, r.rid),
            ));
        }
        IommuFault::from_bytes(&bytes[offset_of!(Self, fault)..])?;
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iommu::*;

    #[test]
    fn ioctl_numbers() {
        assert_eq!(VFIO_TYPE, 0x3b);
        assert_eq!(VFIO_GET_API_VERSION, 0x3b64);
        assert_eq!(VFIO_CHECK_EXTENSION, 0x3b65);
        assert_eq!(VFIO_SET_IOMMU, 0x3b66);
        assert_eq!(VFIO_IOMMU_GET_INFO, 0x3b70);
        assert_eq!(VFIO_IOMMU_MAP_DMA, 0x3b71);
        assert_eq!(VFIO_IOMMU_UNMAP_DMA, 0x3b72);
        assert_eq!(VFIO_IOMMU_ATTACH_PASID_TABLE, 0x3b7a);
        assert_eq!(VFIO_IOMMU_DETACH_PASID_TABLE, 0x3b7b);
        assert_eq!(VFIO_IOMMU_CACHE_INVALIDATE, 0x3b7c);
        assert_eq!(VFIO_IOMMU_PASID_REQUEST, 0x3b7f);
        assert_eq!(VFIO_IOMMU_BIND, 0x3b80);
        assert_eq!(VFIO_IOMMU_UNBIND, 0x3b81);
        assert_eq!(VFIO_IOMMU_PAGE_RESPONSE, 0x3ba4);
    }

    /// Sizes and offsets computed by hand from the C headers (x86-64).
    #[test]
    fn layouts_match_the_c_headers() {
        assert_eq!(size_of::<VfioInfoCapHeader>(), 8);
        assert_eq!(offset_of!(VfioInfoCapHeader, version), 2);
        assert_eq!(offset_of!(VfioInfoCapHeader, next), 4);
        assert_eq!(size_of::<VfioIommuType1Info>(), 24);
        assert_eq!(offset_of!(VfioIommuType1Info, iova_pgsizes), 8);
        assert_eq!(offset_of!(VfioIommuType1Info, cap_offset), 16);
        assert_eq!(offset_of!(VfioIommuType1Info, pad), 20);
        assert_eq!(offset_of!(VfioIommuType1DmaUnmap, data), 24);
        assert_eq!(size_of::<VfioIommuType1InfoCapNesting>(), 72);
        assert_eq!(offset_of!(VfioIommuType1InfoCapNesting, info), 8);
        assert_eq!(size_of::<VfioIommuType1DmaMap>(), 32);
        assert_eq!(offset_of!(VfioIommuType1DmaMap, vaddr), 8);
        assert_eq!(offset_of!(VfioIommuType1DmaMap, iova), 16);
        assert_eq!(offset_of!(VfioIommuType1DmaMap, size), 24);
        assert_eq!(size_of::<VfioIommuType1DmaUnmap>(), 24);
        assert_eq!(offset_of!(VfioIommuType1DmaUnmap, size), 16);
        assert_eq!(size_of::<VfioIommuType1PasidRequest>(), 16);
        assert_eq!(offset_of!(VfioIommuType1PasidRequest, range), 8);
        assert_eq!(offset_of!(VfioPasidRange, max), 4);
        assert_eq!(size_of::<VfioIommuType1Bind>(), 8);
        assert_eq!(size_of::<VfioIommuType1CacheInvalidate>(), 64);
        assert_eq!(offset_of!(VfioIommuType1CacheInvalidate, info), 8);
        assert_eq!(size_of::<VfioIommuType1AttachPasidTable>(), 40);
        assert_eq!(offset_of!(VfioIommuType1AttachPasidTable, config), 8);
        assert_eq!(size_of::<VfioIommuType1PageResponse>(), 36);
        assert_eq!(offset_of!(VfioIommuType1PageResponse, rid), 8);
        assert_eq!(offset_of!(VfioIommuType1PageResponse, response), 12);
        assert_eq!(size_of::<VfioIommuType1Fault>(), 72);
        assert_eq!(offset_of!(VfioIommuType1Fault, fault), 8);
    }

    fn map() -> VfioIommuType1DmaMap {
        VfioIommuType1DmaMap {
            argsz: 32,
            flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
            vaddr: 0x7f00_0000_0000,
            iova: 0x10_0000,
            size: 0x20_0000,
        }
    }

    #[test]
    fn dma_map_rules() {
        assert_eq!(
            VfioIommuType1DmaMap::from_bytes(&map().to_bytes()).unwrap(),
            map()
        );
        for f in [
            |m: &mut VfioIommuType1DmaMap| m.argsz = 31,
            |m: &mut VfioIommuType1DmaMap| m.flags = 0,
            |m: &mut VfioIommuType1DmaMap| m.flags = 4,
            |m: &mut VfioIommuType1DmaMap| m.size = 0,
            |m: &mut VfioIommuType1DmaMap| m.size = 0x1800,
            |m: &mut VfioIommuType1DmaMap| m.iova = 0x10,
            |m: &mut VfioIommuType1DmaMap| m.vaddr = 0x10,
            |m: &mut VfioIommuType1DmaMap| m.iova = u64::MAX - 0xfff,
            |m: &mut VfioIommuType1DmaMap| m.vaddr = u64::MAX - 0xfff,
        ] {
            let mut m = map();
            f(&mut m);
            assert_eq!(
                VfioIommuType1DmaMap::from_bytes(&m.to_bytes())
                    .unwrap_err()
                    .errno(),
                -libc::EINVAL,
                "{m:?}"
            );
        }
        // A larger argsz (newer user header) is accepted and only `sizeof` bytes are read, as
        // the kernel copies; a buffer that ends inside the structure faults.
        let mut m = map();
        m.argsz = 40;
        let b = m.to_bytes();
        assert!(VfioIommuType1DmaMap::from_bytes(&b).is_ok());
        assert_eq!(
            VfioIommuType1DmaMap::from_bytes(&b[..31])
                .unwrap_err()
                .errno(),
            -libc::EFAULT
        );
    }

    #[test]
    fn unmap_and_pasid_request_rules() {
        let u = VfioIommuType1DmaUnmap {
            argsz: 24,
            flags: 0,
            iova: 0x1000,
            size: 0x1000,
            ..Default::default()
        };
        assert!(VfioIommuType1DmaUnmap::from_bytes(&u.to_bytes()).is_ok());
        let mut d = u;
        d.flags = VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP;
        assert_eq!(
            VfioIommuType1DmaUnmap::from_bytes(&d.to_bytes())
                .unwrap_err()
                .errno(),
            -libc::EINVAL
        );

        let r = VfioIommuType1PasidRequest {
            argsz: 16,
            flags: VFIO_IOMMU_FLAG_ALLOC_PASID,
            range: VfioPasidRange {
                min: 1,
                max: 0xf_ffff,
            },
        };
        assert!(VfioIommuType1PasidRequest::from_bytes(&r.to_bytes()).is_ok());
        for f in [
            |r: &mut VfioIommuType1PasidRequest| r.flags = 0,
            |r: &mut VfioIommuType1PasidRequest| r.flags = 3,
            |r: &mut VfioIommuType1PasidRequest| r.flags = 4,
            |r: &mut VfioIommuType1PasidRequest| r.argsz = 12,
            |r: &mut VfioIommuType1PasidRequest| r.range.max = 0x10_0000,
            |r: &mut VfioIommuType1PasidRequest| r.range.min = 0xf_ffff + 1,
        ] {
            let mut x = r;
            f(&mut x);
            assert_eq!(
                VfioIommuType1PasidRequest::from_bytes(&x.to_bytes())
                    .unwrap_err()
                    .errno(),
                -libc::EINVAL,
                "{x:?}"
            );
        }
    }

    fn bind() -> VfioBindGuestPasid {
        VfioBindGuestPasid {
            header: VfioIommuType1Bind {
                argsz: 80,
                bind_type: VFIO_IOMMU_BIND_GUEST_PASID,
            },
            data: IommuGpasidBindData {
                argsz: 72,
                version: 1,
                format: IOMMU_PASID_FORMAT_INTEL_VTD,
                addr_width: 48,
                flags: 0,
                gpgd: 0x5000,
                hpasid: 3,
                gpasid: 0,
                padding: [0; 8],
                vendor: IommuGpasidBindVendor::default(),
            },
        }
    }

    #[test]
    fn bind_rules() {
        let b = bind();
        let bytes = b.to_bytes();
        assert_eq!(bytes.len(), 80);
        assert_eq!(VfioBindGuestPasid::from_bytes(&bytes).unwrap(), b);
        let mut p = b;
        p.header.bind_type = VFIO_IOMMU_BIND_PROCESS;
        assert_eq!(
            VfioBindGuestPasid::from_bytes(&p.to_bytes()).unwrap_err(),
            UapiError::UnsupportedBindType(0)
        );
        let mut s = b;
        s.header.argsz = 79;
        assert_eq!(
            VfioBindGuestPasid::from_bytes(&s.to_bytes())
                .unwrap_err()
                .errno(),
            -libc::EINVAL
        );
        assert_eq!(
            VfioBindGuestPasid::from_bytes(&bytes[..8])
                .unwrap_err()
                .errno(),
            -libc::EFAULT
        );
        assert_eq!(
            VfioBindGuestPasid::from_bytes(&bytes[..79])
                .unwrap_err()
                .errno(),
            -libc::EFAULT
        );
    }

    #[test]
    fn cache_invalidate_wrapper() {
        let mut info = IommuCacheInvalidateInfo {
            argsz: 32,
            version: 1,
            cache: IOMMU_CACHE_INV_TYPE_IOTLB,
            granularity: IOMMU_INV_GRANU_PASID,
            ..Default::default()
        };
        info.set_pasid_info(IommuInvPasidInfo {
            flags: IOMMU_INV_PASID_FLAGS_PASID,
            archid: 0,
            pasid: 4,
        });
        let w = VfioIommuType1CacheInvalidate {
            argsz: 40,
            flags: 0,
            info,
        };
        let bytes = w.to_bytes();
        let d = VfioIommuType1CacheInvalidate::from_bytes(&bytes[..40]).unwrap();
        assert_eq!(d.info.pasid_info().pasid, 4);
        let mut f = w;
        f.flags = 1;
        assert_eq!(
            VfioIommuType1CacheInvalidate::from_bytes(&f.to_bytes())
                .unwrap_err()
                .errno(),
            -libc::EINVAL
        );
        let mut o = w;
        o.argsz = 39;
        assert_eq!(
            VfioIommuType1CacheInvalidate::from_bytes(&o.to_bytes())
                .unwrap_err()
                .errno(),
            -libc::EINVAL
        );
    }

    #[test]
    fn page_response_wrapper() {
        let w = VfioIommuType1PageResponse {
            argsz: 36,
            flags: VFIO_IOMMU_PAGE_RESPONSE_RID_VALID,
            rid: 0x0310,
            response: IommuPageResponse {
                argsz: 24,
                version: IOMMU_PAGE_RESP_VERSION_1,
                flags: IOMMU_PAGE_RESP_PASID_VALID,
                pasid: 0x42,
                grpid: 7,
                code: IOMMU_PAGE_RESP_SUCCESS,
            },
        };
        let bytes = w.to_bytes();
        assert_eq!(&bytes[8..12], &0x0310u32.to_le_bytes());
        assert_eq!(&bytes[12..16], &24u32.to_le_bytes());
        assert_eq!(VfioIommuType1PageResponse::from_bytes(&bytes).unwrap(), w);
        assert_eq!(
            VfioIommuType1PageResponse::from_bytes(&bytes[..35])
                .unwrap_err()
                .errno(),
            -libc::EFAULT
        );
        for f in [
            |w: &mut VfioIommuType1PageResponse| w.argsz = 35,
            |w: &mut VfioIommuType1PageResponse| w.argsz = 8,
            |w: &mut VfioIommuType1PageResponse| w.flags = 2,
            |w: &mut VfioIommuType1PageResponse| w.rid = 0x1_0000,
            |w: &mut VfioIommuType1PageResponse| w.flags = 0,
            |w: &mut VfioIommuType1PageResponse| w.response.argsz = 20,
            |w: &mut VfioIommuType1PageResponse| w.response.code = 9,
        ] {
            let mut x = w;
            f(&mut x);
            assert_eq!(
                VfioIommuType1PageResponse::from_bytes(&x.to_bytes())
                    .unwrap_err()
                    .errno(),
                -libc::EINVAL,
                "{x:?}"
            );
        }
        // Without a device, the rid must be zero.
        let mut any = w;
        any.flags = 0;
        any.rid = 0;
        assert_eq!(
            VfioIommuType1PageResponse::from_bytes(&any.to_bytes()).unwrap(),
            any
        );
    }
}
