//! `include/uapi/linux/iommu.h` of Linux v5.10, plus the two structures the SVA series
//! carried alongside it: `iommu_pasid_table_config` (Eric Auger's "SMMUv3 Nested Stage
//! Setup", as the seed series used it) and `iommu_nesting_info` (posted with v7 of "vfio:
//! expose virtual Shared Virtual Addressing to VMs", which never reached a release).
//!
//! C unions are represented without Rust unions, so that all code stays safe:
//! - a union with a single member (`vendor`, `vendor_data`) is a struct with that member,
//!   which has the same layout;
//! - the `granu` union of `iommu_cache_invalidate_info` is stored as its larger member,
//!   `iommu_inv_addr_info`, of which `iommu_inv_pasid_info` is a layout prefix (same
//!   `flags`, `archid`, `pasid` offsets, asserted by the tests); read it with
//!   [`IommuCacheInvalidateInfo::pasid_info`].
//!
//! `from_bytes` validates exactly as the v5.10 IOMMU core does (`iommu_uapi_*` and
//! `iommu_check_*_data`) and adds the range checks the VT-d driver applies later (20-bit
//! PASIDs, page alignment), so a decoded value is always usable.

use std::mem::{offset_of, size_of};

use vsva_vtd::addr::Pasid;

use super::wire::{check_flags, check_zero, read_prefix, read_with_argsz, Wire};
use crate::error::UapiError;
use crate::wire::c_struct;

/// The smallest page of VT-d first- and second-level tables.
pub const PAGE_SIZE: u64 = 4096;

/// Checks that a 64-bit PASID field holds a 20-bit PASID.
pub(crate) fn check_pasid(raw: u64, what: &'static str) -> Result<Pasid, UapiError> {
    u32::try_from(raw)
        .ok()
        .and_then(|r| Pasid::new(r).ok())
        .ok_or_else(|| UapiError::field(what, format!("PASID {raw:#x} exceeds 20 bits")))
}

/// Reads a fixed-size structure with no `argsz`; `-EFAULT` when the buffer is shorter.
fn read_exact<T: Wire>(bytes: &[u8], what: &'static str) -> Result<T, UapiError> {
    if bytes.len() < size_of::<T>() {
        return Err(UapiError::BufferTooShort {
            what,
            len: bytes.len(),
            need: size_of::<T>(),
        });
    }
    Ok(read_prefix(bytes, size_of::<T>()))
}

// ---------------------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------------------

/// `IOMMU_FAULT_PERM_READ`: the access reads.
pub const IOMMU_FAULT_PERM_READ: u32 = 1 << 0;
/// `IOMMU_FAULT_PERM_WRITE`: the access writes.
pub const IOMMU_FAULT_PERM_WRITE: u32 = 1 << 1;
/// `IOMMU_FAULT_PERM_EXEC`: the access is an instruction fetch.
pub const IOMMU_FAULT_PERM_EXEC: u32 = 1 << 2;
/// `IOMMU_FAULT_PERM_PRIV`: the access is privileged (supervisor).
pub const IOMMU_FAULT_PERM_PRIV: u32 = 1 << 3;
/// Every `IOMMU_FAULT_PERM_*` bit.
const IOMMU_FAULT_PERM_MASK: u32 =
    IOMMU_FAULT_PERM_READ | IOMMU_FAULT_PERM_WRITE | IOMMU_FAULT_PERM_EXEC | IOMMU_FAULT_PERM_PRIV;

/// `IOMMU_FAULT_DMA_UNRECOV` (`enum iommu_fault_type`): an unrecoverable fault.
pub const IOMMU_FAULT_DMA_UNRECOV: u32 = 1;
/// `IOMMU_FAULT_PAGE_REQ`: a page request.
pub const IOMMU_FAULT_PAGE_REQ: u32 = 2;

/// `IOMMU_FAULT_REASON_UNKNOWN` (`enum iommu_fault_reason`).
pub const IOMMU_FAULT_REASON_UNKNOWN: u32 = 0;
/// `IOMMU_FAULT_REASON_PASID_FETCH`: the PASID table could not be read.
pub const IOMMU_FAULT_REASON_PASID_FETCH: u32 = 1;
/// `IOMMU_FAULT_REASON_BAD_PASID_ENTRY`: the PASID entry is invalid or misconfigured.
pub const IOMMU_FAULT_REASON_BAD_PASID_ENTRY: u32 = 2;
/// `IOMMU_FAULT_REASON_PASID_INVALID`: the PASID is out of range or disabled.
pub const IOMMU_FAULT_REASON_PASID_INVALID: u32 = 3;
/// `IOMMU_FAULT_REASON_WALK_EABT`: fetching or updating a table entry aborted.
pub const IOMMU_FAULT_REASON_WALK_EABT: u32 = 4;
/// `IOMMU_FAULT_REASON_PTE_FETCH`: the page table entry could not be read (translation fault).
pub const IOMMU_FAULT_REASON_PTE_FETCH: u32 = 5;
/// `IOMMU_FAULT_REASON_PERMISSION`: a permission check failed.
pub const IOMMU_FAULT_REASON_PERMISSION: u32 = 6;
/// `IOMMU_FAULT_REASON_ACCESS`: an access flag check failed.
pub const IOMMU_FAULT_REASON_ACCESS: u32 = 7;
/// `IOMMU_FAULT_REASON_OOR_ADDRESS`: a stage's output address is out of range.
pub const IOMMU_FAULT_REASON_OOR_ADDRESS: u32 = 8;

/// `IOMMU_FAULT_UNRECOV_PASID_VALID`: `pasid` is valid.
pub const IOMMU_FAULT_UNRECOV_PASID_VALID: u32 = 1 << 0;
/// `IOMMU_FAULT_UNRECOV_ADDR_VALID`: `addr` is valid.
pub const IOMMU_FAULT_UNRECOV_ADDR_VALID: u32 = 1 << 1;
/// `IOMMU_FAULT_UNRECOV_FETCH_ADDR_VALID`: `fetch_addr` is valid.
pub const IOMMU_FAULT_UNRECOV_FETCH_ADDR_VALID: u32 = 1 << 2;

/// Every `IOMMU_FAULT_UNRECOV_*` flag.
const IOMMU_FAULT_UNRECOV_MASK: u32 = IOMMU_FAULT_UNRECOV_PASID_VALID
    | IOMMU_FAULT_UNRECOV_ADDR_VALID
    | IOMMU_FAULT_UNRECOV_FETCH_ADDR_VALID;

/// `IOMMU_FAULT_PAGE_REQUEST_PASID_VALID`: `pasid` is valid.
pub const IOMMU_FAULT_PAGE_REQUEST_PASID_VALID: u32 = 1 << 0;
/// `IOMMU_FAULT_PAGE_REQUEST_LAST_PAGE`: the last request of its group; the group expects
/// one page response.
pub const IOMMU_FAULT_PAGE_REQUEST_LAST_PAGE: u32 = 1 << 1;
/// `IOMMU_FAULT_PAGE_REQUEST_PRIV_DATA`: `private_data` is valid.
pub const IOMMU_FAULT_PAGE_REQUEST_PRIV_DATA: u32 = 1 << 2;
/// `IOMMU_FAULT_PAGE_RESPONSE_NEEDS_PASID`: the response must carry the request's PASID.
pub const IOMMU_FAULT_PAGE_RESPONSE_NEEDS_PASID: u32 = 1 << 3;
/// Every `IOMMU_FAULT_PAGE_REQUEST_*` flag.
const IOMMU_FAULT_PAGE_REQUEST_MASK: u32 = IOMMU_FAULT_PAGE_REQUEST_PASID_VALID
    | IOMMU_FAULT_PAGE_REQUEST_LAST_PAGE
    | IOMMU_FAULT_PAGE_REQUEST_PRIV_DATA
    | IOMMU_FAULT_PAGE_RESPONSE_NEEDS_PASID;

c_struct! {
    /// `struct iommu_fault_unrecoverable`: a fault the device cannot recover from.
    pub struct IommuFaultUnrecoverable {
        /// `IOMMU_FAULT_REASON_*`.
        pub reason: u32,
        /// `IOMMU_FAULT_UNRECOV_*`.
        pub flags: u32,
        /// Process Address Space ID.
        pub pasid: u32,
        /// `IOMMU_FAULT_PERM_*` of the faulting access.
        pub perm: u32,
        /// Faulting page address.
        pub addr: u64,
        /// Address whose fetch aborted.
        pub fetch_addr: u64,
    }
}

impl IommuFaultUnrecoverable {
    /// Validates: a defined reason, known flags and permissions, a 20-bit PASID when it is
    /// valid, and zero in every field its flag does not declare valid.
    pub fn validate(&self) -> Result<(), UapiError> {
        const WHAT: &str = "iommu_fault_unrecoverable";
        if self.reason > IOMMU_FAULT_REASON_OOR_ADDRESS {
            return Err(UapiError::field(
                WHAT,
                format!("fault reason {} is not defined", self.reason),
            ));
        }
        check_flags(self.flags.into(), IOMMU_FAULT_UNRECOV_MASK.into(), WHAT)?;
        check_flags(self.perm.into(), IOMMU_FAULT_PERM_MASK.into(), WHAT)?;
        let valid = |f: u32| self.flags & f != 0;
        if valid(IOMMU_FAULT_UNRECOV_PASID_VALID) {
            check_pasid(self.pasid.into(), WHAT)?;
        }
        for (flag, value, name) in [
            (
                IOMMU_FAULT_UNRECOV_PASID_VALID,
                u64::from(self.pasid),
                "pasid",
            ),
            (IOMMU_FAULT_UNRECOV_ADDR_VALID, self.addr, "addr"),
            (
                IOMMU_FAULT_UNRECOV_FETCH_ADDR_VALID,
                self.fetch_addr,
                "fetch_addr",
            ),
        ] {
            if !valid(flag) && value != 0 {
                return Err(UapiError::field(
                    WHAT,
                    format!("{name} is set but not flagged valid"),
                ));
            }
        }
        Ok(())
    }
}

c_struct! {
    /// `struct iommu_fault_page_request`: one PCI PRI page request.
    pub struct IommuFaultPageRequest {
        /// `IOMMU_FAULT_PAGE_REQUEST_*` and `IOMMU_FAULT_PAGE_RESPONSE_NEEDS_PASID`.
        pub flags: u32,
        /// Process Address Space ID.
        pub pasid: u32,
        /// Page Request Group Index.
        pub grpid: u32,
        /// `IOMMU_FAULT_PERM_*` requested.
        pub perm: u32,
        /// Page address.
        pub addr: u64,
        /// Device-specific private data.
        pub private_data: [u64; 2],
    }
}

impl IommuFaultPageRequest {
    /// Validates: known flags and permissions, a 20-bit PASID when it is valid, a PASID
    /// whenever the response needs one, a page-aligned address.
    pub fn validate(&self) -> Result<(), UapiError> {
        const WHAT: &str = "iommu_fault_page_request";
        check_flags(
            self.flags.into(),
            IOMMU_FAULT_PAGE_REQUEST_MASK.into(),
            WHAT,
        )?;
        check_flags(self.perm.into(), IOMMU_FAULT_PERM_MASK.into(), WHAT)?;
        let pasid_valid = self.flags & IOMMU_FAULT_PAGE_REQUEST_PASID_VALID != 0;
        if pasid_valid {
            check_pasid(self.pasid.into(), WHAT)?;
        } else if self.flags & IOMMU_FAULT_PAGE_RESPONSE_NEEDS_PASID != 0 {
            return Err(UapiError::field(
                WHAT,
                "the response needs a PASID but the request has none",
            ));
        }
        if self.addr % PAGE_SIZE != 0 {
            return Err(UapiError::field(
                WHAT,
                format!("page address {:#x} is not page aligned", self.addr),
            ));
        }
        Ok(())
    }
}

c_struct! {
    /// `struct iommu_fault`: one fault record, 64 bytes, as VFIO's DMA fault region holds
    /// them. The C union of `event`, `prm` and `padding2[56]` (8-byte aligned) is stored as
    /// seven little-endian qwords; read it with [`IommuFault::page_request`] or
    /// [`IommuFault::unrecoverable`].
    pub struct IommuFault {
        /// `IOMMU_FAULT_DMA_UNRECOV` or `IOMMU_FAULT_PAGE_REQ` (C name `type`).
        pub type_: u32,
        /// Reserved, zero.
        pub padding: u32,
        /// The union: `event`, `prm`, or `padding2`.
        pub data: [u64; 7],
    }
}

impl IommuFault {
    /// Decodes and validates a record: whole structure, a defined type, zero padding, a
    /// valid member, and zero bytes past it.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, UapiError> {
        const WHAT: &str = "iommu_fault";
        let f: Self = read_exact(bytes, WHAT)?;
        if f.padding != 0 {
            return Err(UapiError::field(WHAT, "reserved padding is not zero"));
        }
        let used = match f.type_ {
            IOMMU_FAULT_PAGE_REQ => {
                IommuFaultPageRequest::read(&f.union_bytes()).validate()?;
                size_of::<IommuFaultPageRequest>()
            }
            IOMMU_FAULT_DMA_UNRECOV => {
                IommuFaultUnrecoverable::read(&f.union_bytes()).validate()?;
                size_of::<IommuFaultUnrecoverable>()
            }
            t => {
                return Err(UapiError::field(
                    WHAT,
                    format!("fault type {t} is not defined"),
                ))
            }
        };
        check_zero(&f.union_bytes()[used..], WHAT)?;
        Ok(f)
    }

    /// The page request, when the record is one.
    pub fn page_request(&self) -> Option<IommuFaultPageRequest> {
        (self.type_ == IOMMU_FAULT_PAGE_REQ)
            .then(|| IommuFaultPageRequest::read(&self.union_bytes()))
    }

    /// The unrecoverable fault, when the record is one.
    pub fn unrecoverable(&self) -> Option<IommuFaultUnrecoverable> {
        (self.type_ == IOMMU_FAULT_DMA_UNRECOV)
            .then(|| IommuFaultUnrecoverable::read(&self.union_bytes()))
    }

    fn union_bytes(&self) -> [u8; 56] {
        let mut b = [0u8; 56];
        self.data.write(&mut b);
        b
    }

    fn with_member<T: Wire>(type_: u32, member: &T) -> Self {
        let mut b = [0u8; 56];
        member.write(&mut b);
        IommuFault {
            type_,
            padding: 0,
            data: <[u64; 7]>::read(&b),
        }
    }
}

impl From<&IommuFaultPageRequest> for IommuFault {
    fn from(prm: &IommuFaultPageRequest) -> Self {
        IommuFault::with_member(IOMMU_FAULT_PAGE_REQ, prm)
    }
}

impl From<&IommuFaultUnrecoverable> for IommuFault {
    fn from(event: &IommuFaultUnrecoverable) -> Self {
        IommuFault::with_member(IOMMU_FAULT_DMA_UNRECOV, event)
    }
}

// ---------------------------------------------------------------------------------------
// Page response
// ---------------------------------------------------------------------------------------

/// `IOMMU_PAGE_RESP_VERSION_1`.
pub const IOMMU_PAGE_RESP_VERSION_1: u32 = 1;
/// `IOMMU_PAGE_RESP_PASID_VALID`: the response carries a PASID.
pub const IOMMU_PAGE_RESP_PASID_VALID: u32 = 1 << 0;
/// `IOMMU_PAGE_RESP_SUCCESS`: the fault is handled, retry the access ("Success" in PCI PRI).
pub const IOMMU_PAGE_RESP_SUCCESS: u32 = 0;
/// `IOMMU_PAGE_RESP_INVALID`: do not retry ("Invalid Request" in PCI PRI).
pub const IOMMU_PAGE_RESP_INVALID: u32 = 1;
/// `IOMMU_PAGE_RESP_FAILURE`: general error ("Response Failure" in PCI PRI).
pub const IOMMU_PAGE_RESP_FAILURE: u32 = 2;

c_struct! {
    /// `struct iommu_page_response`: the answer to a page request group.
    pub struct IommuPageResponse {
        /// User-filled size of the structure.
        pub argsz: u32,
        /// `IOMMU_PAGE_RESP_VERSION_1`.
        pub version: u32,
        /// `IOMMU_PAGE_RESP_PASID_VALID`.
        pub flags: u32,
        /// Process Address Space ID, when `flags` says so.
        pub pasid: u32,
        /// Page Request Group Index.
        pub grpid: u32,
        /// `IOMMU_PAGE_RESP_*` response code.
        pub code: u32,
    }
}

impl IommuPageResponse {
    /// Decodes and validates: whole structure required, version 1, known flags, a defined
    /// response code, a 20-bit PASID.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, UapiError> {
        const WHAT: &str = "iommu_page_response";
        let r: Self = read_with_argsz(bytes, size_of::<Self>(), WHAT)?;
        if r.version != IOMMU_PAGE_RESP_VERSION_1 {
            return Err(UapiError::BadVersion {
                what: WHAT,
                version: r.version,
                expected: IOMMU_PAGE_RESP_VERSION_1,
            });
        }
        check_flags(r.flags.into(), IOMMU_PAGE_RESP_PASID_VALID.into(), WHAT)?;
        if r.code > IOMMU_PAGE_RESP_FAILURE {
            return Err(UapiError::field(
                WHAT,
                format!("response code {} is not defined", r.code),
            ));
        }
        check_pasid(r.pasid.into(), WHAT)?;
        Ok(r)
    }
}

// ---------------------------------------------------------------------------------------
// Cache invalidation
// ---------------------------------------------------------------------------------------

/// `IOMMU_CACHE_INVALIDATE_INFO_VERSION_1`.
pub const IOMMU_CACHE_INVALIDATE_INFO_VERSION_1: u32 = 1;
/// `IOMMU_CACHE_INV_TYPE_IOTLB`: the IOMMU IOTLB (and paging-structure caches).
pub const IOMMU_CACHE_INV_TYPE_IOTLB: u8 = 1 << 0;
/// `IOMMU_CACHE_INV_TYPE_DEV_IOTLB`: device IOTLBs (ATS).
pub const IOMMU_CACHE_INV_TYPE_DEV_IOTLB: u8 = 1 << 1;
/// `IOMMU_CACHE_INV_TYPE_PASID`: the PASID cache.
pub const IOMMU_CACHE_INV_TYPE_PASID: u8 = 1 << 2;
/// `IOMMU_CACHE_INV_TYPE_NR`: number of cache types.
pub const IOMMU_CACHE_INV_TYPE_NR: u8 = 3;
/// `IOMMU_INV_GRANU_DOMAIN`: domain-selective invalidation.
pub const IOMMU_INV_GRANU_DOMAIN: u8 = 0;
/// `IOMMU_INV_GRANU_PASID`: PASID-selective invalidation.
pub const IOMMU_INV_GRANU_PASID: u8 = 1;
/// `IOMMU_INV_GRANU_ADDR`: page-selective invalidation.
pub const IOMMU_INV_GRANU_ADDR: u8 = 2;
/// `IOMMU_INV_GRANU_NR`: number of granularities.
pub const IOMMU_INV_GRANU_NR: u8 = 3;
/// `IOMMU_INV_ADDR_FLAGS_PASID`: `pasid` is valid.
pub const IOMMU_INV_ADDR_FLAGS_PASID: u32 = 1 << 0;
/// `IOMMU_INV_ADDR_FLAGS_ARCHID`: `archid` is valid.
pub const IOMMU_INV_ADDR_FLAGS_ARCHID: u32 = 1 << 1;
/// `IOMMU_INV_ADDR_FLAGS_LEAF`: only leaf entries changed; paging-structure caches may stay.
pub const IOMMU_INV_ADDR_FLAGS_LEAF: u32 = 1 << 2;
/// `IOMMU_INV_PASID_FLAGS_PASID`: `pasid` is valid.
pub const IOMMU_INV_PASID_FLAGS_PASID: u32 = 1 << 0;
/// `IOMMU_INV_PASID_FLAGS_ARCHID`: `archid` is valid.
pub const IOMMU_INV_PASID_FLAGS_ARCHID: u32 = 1 << 1;

c_struct! {
    /// `struct iommu_inv_pasid_info`: PASID-selective invalidation.
    pub struct IommuInvPasidInfo {
        /// `IOMMU_INV_PASID_FLAGS_*`.
        pub flags: u32,
        /// Architecture-specific id.
        pub archid: u32,
        /// Process Address Space ID.
        pub pasid: u64,
    }
}

c_struct! {
    /// `struct iommu_inv_addr_info`: address-selective invalidation.
    pub struct IommuInvAddrInfo {
        /// `IOMMU_INV_ADDR_FLAGS_*`.
        pub flags: u32,
        /// Architecture-specific id.
        pub archid: u32,
        /// Process Address Space ID.
        pub pasid: u64,
        /// First-level input address of the first granule.
        pub addr: u64,
        /// Size of one granule (page or block) in bytes.
        pub granule_size: u64,
        /// Number of contiguous granules.
        pub nb_granules: u64,
    }
}

c_struct! {
    /// `struct iommu_cache_invalidate_info`: a first-level cache invalidation.
    ///
    /// `granu` stands for the C union `{ iommu_inv_pasid_info pasid_info;
    /// iommu_inv_addr_info addr_info; }`, stored as `addr_info` (see the module doc).
    pub struct IommuCacheInvalidateInfo {
        /// User-filled size of the structure.
        pub argsz: u32,
        /// `IOMMU_CACHE_INVALIDATE_INFO_VERSION_1`.
        pub version: u32,
        /// `IOMMU_CACHE_INV_TYPE_*` bits.
        pub cache: u8,
        /// `IOMMU_INV_GRANU_*`.
        pub granularity: u8,
        /// Reserved, zero.
        pub padding: [u8; 6],
        /// The granularity's data: `addr_info`, or `pasid_info` as its prefix.
        pub granu: IommuInvAddrInfo,
    }
}

impl IommuCacheInvalidateInfo {
    /// The `granu.pasid_info` view of the union.
    pub fn pasid_info(&self) -> IommuInvPasidInfo {
        IommuInvPasidInfo {
            flags: self.granu.flags,
            archid: self.granu.archid,
            pasid: self.granu.pasid,
        }
    }

    /// Sets the union to `granu.pasid_info` (the address fields become zero).
    pub fn set_pasid_info(&mut self, info: IommuInvPasidInfo) {
        self.granu = IommuInvAddrInfo {
            flags: info.flags,
            archid: info.archid,
            pasid: info.pasid,
            ..IommuInvAddrInfo::default()
        };
    }

    /// Decodes and validates as v5.10 `iommu_uapi_cache_invalidate` and
    /// `iommu_check_cache_invl_data` do: `argsz` covers the fields before the union and the
    /// union member the granularity uses; version 1; known cache types, granularity and
    /// flags; no PASID-cache invalidation by address, no device-IOTLB invalidation by domain;
    /// zero padding. Then the VT-d driver's ranges: a 20-bit PASID, a power-of-two granule of
    /// at least 4 KiB, an aligned, non-empty, non-wrapping address range.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, UapiError> {
        const WHAT: &str = "iommu_cache_invalidate_info";
        let minsz = offset_of!(Self, granu);
        let info: Self = read_with_argsz(bytes, minsz, WHAT)?;
        let need = match info.granularity {
            IOMMU_INV_GRANU_PASID => minsz + size_of::<IommuInvPasidInfo>(),
            IOMMU_INV_GRANU_ADDR => size_of::<Self>(),
            _ => minsz,
        };
        if (info.argsz as usize) < need {
            return Err(UapiError::ArgszTooSmall {
                what: WHAT,
                argsz: info.argsz,
                min: need,
            });
        }
        info.validate()?;
        Ok(info)
    }

    fn validate(&self) -> Result<(), UapiError> {
        const WHAT: &str = "iommu_cache_invalidate_info";
        if self.version != IOMMU_CACHE_INVALIDATE_INFO_VERSION_1 {
            return Err(UapiError::BadVersion {
                what: WHAT,
                version: self.version,
                expected: IOMMU_CACHE_INVALIDATE_INFO_VERSION_1,
            });
        }
        check_flags(
            self.cache.into(),
            (1 << IOMMU_CACHE_INV_TYPE_NR) - 1,
            "iommu_cache_invalidate_info.cache",
        )?;
        match self.granularity {
            IOMMU_INV_GRANU_DOMAIN => {
                if self.cache & IOMMU_CACHE_INV_TYPE_DEV_IOTLB != 0 {
                    return Err(UapiError::field(
                        WHAT,
                        "device-IOTLB invalidation has no domain granularity",
                    ));
                }
            }
            IOMMU_INV_GRANU_PASID => {
                let p = self.pasid_info();
                check_flags(
                    p.flags.into(),
                    (IOMMU_INV_PASID_FLAGS_PASID | IOMMU_INV_PASID_FLAGS_ARCHID).into(),
                    "iommu_inv_pasid_info",
                )?;
                if p.flags & IOMMU_INV_PASID_FLAGS_PASID != 0 {
                    check_pasid(p.pasid, "iommu_inv_pasid_info")?;
                }
            }
            IOMMU_INV_GRANU_ADDR => {
                if self.cache & IOMMU_CACHE_INV_TYPE_PASID != 0 {
                    return Err(UapiError::field(
                        WHAT,
                        "PASID-cache invalidation has no address granularity",
                    ));
                }
                self.check_addr_info()?;
            }
            g => {
                return Err(UapiError::field(
                    WHAT,
                    format!("granularity {g} is not defined"),
                ))
            }
        }
        check_zero(&self.padding, WHAT)
    }

    fn check_addr_info(&self) -> Result<(), UapiError> {
        const WHAT: &str = "iommu_inv_addr_info";
        let a = &self.granu;
        check_flags(
            a.flags.into(),
            (IOMMU_INV_ADDR_FLAGS_PASID | IOMMU_INV_ADDR_FLAGS_ARCHID | IOMMU_INV_ADDR_FLAGS_LEAF)
                .into(),
            WHAT,
        )?;
        if a.flags & IOMMU_INV_ADDR_FLAGS_PASID != 0 {
            check_pasid(a.pasid, WHAT)?;
        }
        if !a.granule_size.is_power_of_two() || a.granule_size < PAGE_SIZE {
            return Err(UapiError::field(
                WHAT,
                format!(
                    "granule size {:#x} is not a power of two of at least 4 KiB",
                    a.granule_size
                ),
            ));
        }
        if a.nb_granules == 0 {
            return Err(UapiError::field(WHAT, "no granules to invalidate"));
        }
        if a.addr & (a.granule_size - 1) != 0 {
            return Err(UapiError::field(
                WHAT,
                format!(
                    "address {:#x} is not aligned to its granule {:#x}",
                    a.addr, a.granule_size
                ),
            ));
        }
        let wraps = a
            .granule_size
            .checked_mul(a.nb_granules)
            .and_then(|len| a.addr.checked_add(len - 1))
            .is_none();
        if wraps {
            return Err(UapiError::field(
                WHAT,
                format!(
                    "{:#x} granules of {:#x} at {:#x} overflow the address space",
                    a.nb_granules, a.granule_size, a.addr
                ),
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Guest PASID bind
// ---------------------------------------------------------------------------------------

/// `IOMMU_GPASID_BIND_VERSION_1`.
pub const IOMMU_GPASID_BIND_VERSION_1: u32 = 1;
/// `IOMMU_PASID_FORMAT_INTEL_VTD`: VT-d PASID table entry format.
pub const IOMMU_PASID_FORMAT_INTEL_VTD: u32 = 1;
/// `IOMMU_PASID_FORMAT_ARM_SMMU_V3`: Arm SMMUv3 nesting information (the arm-smmu-v3
/// nesting-info patch, Vivek Gautam, Feb 2021, on top of `iommu_nesting_info`); guest
/// PASID binding does not take it.
pub const IOMMU_PASID_FORMAT_ARM_SMMU_V3: u32 = 2;
/// `IOMMU_PASID_FORMAT_LAST`.
pub const IOMMU_PASID_FORMAT_LAST: u32 = 3;
/// `IOMMU_SVA_GPASID_VAL`: `gpasid` is valid.
pub const IOMMU_SVA_GPASID_VAL: u64 = 1 << 0;
/// `IOMMU_SVA_VTD_GPASID_SRE`: supervisor requests allowed (PASID entry SRE).
pub const IOMMU_SVA_VTD_GPASID_SRE: u64 = 1 << 0;
/// `IOMMU_SVA_VTD_GPASID_EAFE`: extended access flag enable (PASID entry EAFE).
pub const IOMMU_SVA_VTD_GPASID_EAFE: u64 = 1 << 1;
/// `IOMMU_SVA_VTD_GPASID_PCD`: page-level cache disable (PASID entry PCD).
pub const IOMMU_SVA_VTD_GPASID_PCD: u64 = 1 << 2;
/// `IOMMU_SVA_VTD_GPASID_PWT`: page-level write-through (PASID entry PWT).
pub const IOMMU_SVA_VTD_GPASID_PWT: u64 = 1 << 3;
/// `IOMMU_SVA_VTD_GPASID_EMTE`: extended memory type enable (PASID entry EMTE).
pub const IOMMU_SVA_VTD_GPASID_EMTE: u64 = 1 << 4;
/// `IOMMU_SVA_VTD_GPASID_CD`: PASID-level cache disable (PASID entry CD).
pub const IOMMU_SVA_VTD_GPASID_CD: u64 = 1 << 5;
/// `IOMMU_SVA_VTD_GPASID_LAST` (v5.10; WPE came in v5.12).
pub const IOMMU_SVA_VTD_GPASID_LAST: u64 = 1 << 6;
/// `IOMMU_SVA_VTD_GPASID_MTS_MASK`: the memory-type flags.
pub const IOMMU_SVA_VTD_GPASID_MTS_MASK: u64 = IOMMU_SVA_VTD_GPASID_CD
    | IOMMU_SVA_VTD_GPASID_EMTE
    | IOMMU_SVA_VTD_GPASID_PCD
    | IOMMU_SVA_VTD_GPASID_PWT;

c_struct! {
    /// `struct iommu_gpasid_bind_data_vtd`: the VT-d PASID entry attributes the guest chose.
    pub struct IommuGpasidBindDataVtd {
        /// `IOMMU_SVA_VTD_GPASID_*`.
        pub flags: u64,
        /// Page attribute table, for the effective memory type.
        pub pat: u32,
        /// Extended memory type.
        pub emt: u32,
    }
}

c_struct! {
    /// The single-member `vendor` union of `iommu_gpasid_bind_data`.
    pub struct IommuGpasidBindVendor {
        /// VT-d data, for `IOMMU_PASID_FORMAT_INTEL_VTD`.
        pub vtd: IommuGpasidBindDataVtd,
    }
}

c_struct! {
    /// `struct iommu_gpasid_bind_data`: bind a guest first-level page table to a host PASID.
    pub struct IommuGpasidBindData {
        /// User-filled size of the structure.
        pub argsz: u32,
        /// `IOMMU_GPASID_BIND_VERSION_1`.
        pub version: u32,
        /// `IOMMU_PASID_FORMAT_*`.
        pub format: u32,
        /// Guest virtual address width (48 or 57 on VT-d).
        pub addr_width: u32,
        /// `IOMMU_SVA_GPASID_VAL`.
        pub flags: u64,
        /// Guest page directory base (first-level table pointer, a GPA).
        pub gpgd: u64,
        /// The host PASID the device uses.
        pub hpasid: u64,
        /// The guest's PASID, when `IOMMU_SVA_GPASID_VAL`.
        pub gpasid: u64,
        /// Reserved, zero.
        pub padding: [u8; 8],
        /// Vendor data.
        pub vendor: IommuGpasidBindVendor,
    }
}

impl IommuGpasidBindData {
    /// Decodes and validates as v5.10 `iommu_uapi_sva_bind_gpasid` and
    /// `iommu_check_bind_data` do: `argsz` covers the fixed part and the VT-d data, version
    /// 1, format VT-d (the only one defined), known flags, zero padding; then the VT-d
    /// driver's ranges: known VT-d flags, 20-bit PASIDs, a 4 KiB-aligned `gpgd`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, UapiError> {
        const WHAT: &str = "iommu_gpasid_bind_data";
        let d: Self = read_with_argsz(bytes, offset_of!(Self, vendor), WHAT)?;
        if d.version != IOMMU_GPASID_BIND_VERSION_1 {
            return Err(UapiError::BadVersion {
                what: WHAT,
                version: d.version,
                expected: IOMMU_GPASID_BIND_VERSION_1,
            });
        }
        if d.format != IOMMU_PASID_FORMAT_INTEL_VTD {
            return Err(UapiError::field(
                WHAT,
                format!("PASID format {} is not supported (VT-d is 1)", d.format),
            ));
        }
        if (d.argsz as usize) < size_of::<Self>() {
            return Err(UapiError::ArgszTooSmall {
                what: WHAT,
                argsz: d.argsz,
                min: size_of::<Self>(),
            });
        }
        check_flags(d.flags, IOMMU_SVA_GPASID_VAL, WHAT)?;
        check_zero(&d.padding, WHAT)?;
        check_flags(
            d.vendor.vtd.flags,
            IOMMU_SVA_VTD_GPASID_LAST - 1,
            "iommu_gpasid_bind_data_vtd",
        )?;
        check_pasid(d.hpasid, "iommu_gpasid_bind_data.hpasid")?;
        if d.flags & IOMMU_SVA_GPASID_VAL != 0 {
            check_pasid(d.gpasid, "iommu_gpasid_bind_data.gpasid")?;
        }
        if d.gpgd % PAGE_SIZE != 0 {
            return Err(UapiError::field(
                WHAT,
                format!("gpgd {:#x} is not 4 KiB aligned", d.gpgd),
            ));
        }
        Ok(d)
    }
}

// ---------------------------------------------------------------------------------------
// Guest PASID table (SMMUv3 model)
// ---------------------------------------------------------------------------------------

/// `PASID_TABLE_CFG_VERSION_1`.
pub const PASID_TABLE_CFG_VERSION_1: u32 = 1;
/// `PASID_TABLE_SMMUV3_CFG_VERSION_1`.
pub const PASID_TABLE_SMMUV3_CFG_VERSION_1: u32 = 1;
/// `IOMMU_PASID_FORMAT_SMMUV3`: the PASID table is an SMMUv3 context-descriptor table.
pub const IOMMU_PASID_FORMAT_SMMUV3: u32 = 1;
/// `IOMMU_PASID_CONFIG_TRANSLATE`: the guest stage is translated.
pub const IOMMU_PASID_CONFIG_TRANSLATE: u8 = 1;
/// `IOMMU_PASID_CONFIG_BYPASS`: the guest stage is bypassed.
pub const IOMMU_PASID_CONFIG_BYPASS: u8 = 2;
/// `IOMMU_PASID_CONFIG_ABORT`: guest-stage transactions abort.
pub const IOMMU_PASID_CONFIG_ABORT: u8 = 3;

c_struct! {
    /// `struct iommu_pasid_smmuv3`: the stage-1 fields of an SMMUv3 stream table entry.
    pub struct IommuPasidSmmuv3 {
        /// `PASID_TABLE_SMMUV3_CFG_VERSION_1`.
        pub version: u32,
        /// STE.S1Fmt: 0 linear, 1 two-level with 4 KiB leaves, 2 two-level with 64 KiB.
        pub s1fmt: u8,
        /// STE.S1DSS: behaviour of transactions without a substream id (0..=2).
        pub s1dss: u8,
        /// Reserved, zero.
        pub padding: [u8; 2],
    }
}

c_struct! {
    /// The single-member vendor union of `iommu_pasid_table_config`.
    pub struct IommuPasidTableVendor {
        /// SMMUv3 data, for `IOMMU_PASID_FORMAT_SMMUV3`.
        pub smmuv3: IommuPasidSmmuv3,
    }
}

c_struct! {
    /// `struct iommu_pasid_table_config`: a guest-owned PASID table handed to the host
    /// (the layout the seed series' `VFIO_IOMMU_ATTACH_PASID_TABLE` carried: no `argsz`).
    pub struct IommuPasidTableConfig {
        /// `PASID_TABLE_CFG_VERSION_1`.
        pub version: u32,
        /// `IOMMU_PASID_FORMAT_SMMUV3`.
        pub format: u32,
        /// Guest physical address of the PASID table.
        pub base_ptr: u64,
        /// Number of PASID bits the table covers.
        pub pasid_bits: u8,
        /// `IOMMU_PASID_CONFIG_*`.
        pub config: u8,
        /// Reserved, zero.
        pub padding: [u8; 6],
        /// Vendor data.
        pub vendor_data: IommuPasidTableVendor,
    }
}

impl IommuPasidTableConfig {
    /// Decodes and validates: version 1, SMMUv3 format, a defined config, at most 20 PASID
    /// bits, zero padding; for a translated stage also the SMMUv3 data (version 1, S1Fmt and
    /// S1DSS in range, a 64-byte aligned table as STE.S1ContextPtr requires).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, UapiError> {
        const WHAT: &str = "iommu_pasid_table_config";
        let c: Self = read_exact(bytes, WHAT)?;
        if c.version != PASID_TABLE_CFG_VERSION_1 {
            return Err(UapiError::BadVersion {
                what: WHAT,
                version: c.version,
                expected: PASID_TABLE_CFG_VERSION_1,
            });
        }
        if c.format != IOMMU_PASID_FORMAT_SMMUV3 {
            return Err(UapiError::field(
                WHAT,
                format!("PASID table format {} is not supported", c.format),
            ));
        }
        if !(IOMMU_PASID_CONFIG_TRANSLATE..=IOMMU_PASID_CONFIG_ABORT).contains(&c.config) {
            return Err(UapiError::field(
                WHAT,
                format!("config {} is not defined", c.config),
            ));
        }
        if u32::from(c.pasid_bits) > Pasid::BITS {
            return Err(UapiError::field(
                WHAT,
                format!("{} PASID bits exceed 20", c.pasid_bits),
            ));
        }
        check_zero(&c.padding, WHAT)?;
        let s = &c.vendor_data.smmuv3;
        check_zero(&s.padding, "iommu_pasid_smmuv3")?;
        if c.config == IOMMU_PASID_CONFIG_TRANSLATE {
            if s.version != PASID_TABLE_SMMUV3_CFG_VERSION_1 {
                return Err(UapiError::BadVersion {
                    what: "iommu_pasid_smmuv3",
                    version: s.version,
                    expected: PASID_TABLE_SMMUV3_CFG_VERSION_1,
                });
            }
            if s.s1fmt > 2 || s.s1dss > 2 {
                return Err(UapiError::field(
                    "iommu_pasid_smmuv3",
                    format!("S1Fmt {} / S1DSS {} out of range", s.s1fmt, s.s1dss),
                ));
            }
            if c.base_ptr % 64 != 0 {
                return Err(UapiError::field(
                    WHAT,
                    format!("table base {:#x} is not 64-byte aligned", c.base_ptr),
                ));
            }
        }
        Ok(c)
    }
}

// ---------------------------------------------------------------------------------------
// Nesting capability
// ---------------------------------------------------------------------------------------

/// `IOMMU_NESTING_FEAT_BIND_PGTBL`: user space must bind first-level tables to PASIDs.
pub const IOMMU_NESTING_FEAT_BIND_PGTBL: u32 = 1 << 0;
/// `IOMMU_NESTING_FEAT_CACHE_INVLD`: user space must propagate first-level invalidations.
pub const IOMMU_NESTING_FEAT_CACHE_INVLD: u32 = 1 << 1;

c_struct! {
    /// `struct iommu_nesting_info_vtd`: the VT-d registers a vIOMMU mirrors.
    pub struct IommuNestingInfoVtd {
        /// Reserved, zero.
        pub flags: u32,
        /// Reserved, zero.
        pub padding: [u8; 12],
        /// Capability register (VT-d §11.4.2).
        pub cap_reg: u64,
        /// Extended capability register (VT-d §11.4.3).
        pub ecap_reg: u64,
    }
}

/// `ARM_PGTBL_32_LPAE_S1`: AArch32 LPAE stage-1 tables.
pub const ARM_PGTBL_32_LPAE_S1: u8 = 0x0;
/// `ARM_PGTBL_64_LPAE_S1`: AArch64 (VMSAv8-64) stage-1 tables.
pub const ARM_PGTBL_64_LPAE_S1: u8 = 0x2;

c_struct! {
    /// `struct iommu_nesting_info_arm_smmuv3`: what a guest needs to build stage-1 tables
    /// and CDs the host SMMU accepts.
    pub struct IommuNestingInfoArmSmmuv3 {
        /// Reserved, zero.
        pub flags: u32,
        /// ASID bits (SMMU_IDR0.ASID16: 16, else 8).
        pub asid_bits: u16,
        /// Stage-1 table format, `ARM_PGTBL_*`.
        pub pgtbl_fmt: u8,
        /// Reserved, zero.
        pub padding: [u8; 9],
    }
}

c_struct! {
    /// The `vendor` union of `iommu_nesting_info`, stored as its largest member (`vtd`, 32
    /// bytes); [`IommuNestingInfoVendor::arm_smmuv3`] reads the same bytes as the SMMUv3
    /// member.
    pub struct IommuNestingInfoVendor {
        /// VT-d data, for `IOMMU_PASID_FORMAT_INTEL_VTD`.
        pub vtd: IommuNestingInfoVtd,
    }
}

impl IommuNestingInfoVendor {
    /// The union holding the SMMUv3 member (the rest of its bytes zero).
    pub fn from_arm_smmuv3(s: &IommuNestingInfoArmSmmuv3) -> Self {
        let mut bytes = vec![0u8; size_of::<Self>()];
        s.write(&mut bytes);
        Self::read(&bytes)
    }

    /// The union's bytes as the SMMUv3 member, for `IOMMU_PASID_FORMAT_ARM_SMMU_V3`.
    pub fn arm_smmuv3(&self) -> IommuNestingInfoArmSmmuv3 {
        IommuNestingInfoArmSmmuv3::read(&self.to_bytes())
    }
}

c_struct! {
    /// `struct iommu_nesting_info`: what a nesting-capable host IOMMU offers (reported in
    /// the `VFIO_IOMMU_TYPE1_INFO_CAP_NESTING` capability).
    pub struct IommuNestingInfo {
        /// Size of the whole structure.
        pub argsz: u32,
        /// Reserved, zero.
        pub flags: u32,
        /// `IOMMU_PASID_FORMAT_*`, as in `iommu_gpasid_bind_data`.
        pub format: u32,
        /// `IOMMU_NESTING_FEAT_*`.
        pub features: u32,
        /// Output address width of the first level.
        pub addr_width: u16,
        /// PASID bits supported; 0 means no PASID.
        pub pasid_bits: u16,
        /// Reserved, zero.
        pub padding: [u8; 12],
        /// Vendor data.
        pub vendor: IommuNestingInfoVendor,
    }
}

impl IommuNestingInfo {
    /// Decodes and validates the kernel's report: whole structure, VT-d or SMMUv3 format,
    /// known features, zero reserved fields (the union's bytes past the SMMUv3 member
    /// included), a known SMMUv3 table format and at most 16 ASID bits, at most 20 PASID
    /// bits.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, UapiError> {
        const WHAT: &str = "iommu_nesting_info";
        let n: Self = read_with_argsz(bytes, size_of::<Self>(), WHAT)?;
        check_flags(n.flags.into(), 0, WHAT)?;
        check_flags(
            n.features.into(),
            (IOMMU_NESTING_FEAT_BIND_PGTBL | IOMMU_NESTING_FEAT_CACHE_INVLD).into(),
            WHAT,
        )?;
        check_zero(&n.padding, WHAT)?;
        match n.format {
            IOMMU_PASID_FORMAT_INTEL_VTD => {
                check_flags(n.vendor.vtd.flags.into(), 0, "iommu_nesting_info_vtd")?;
                check_zero(&n.vendor.vtd.padding, "iommu_nesting_info_vtd")?;
            }
            IOMMU_PASID_FORMAT_ARM_SMMU_V3 => {
                const SMMU: &str = "iommu_nesting_info_arm_smmuv3";
                let s = n.vendor.arm_smmuv3();
                check_flags(s.flags.into(), 0, SMMU)?;
                check_zero(&s.padding, SMMU)?;
                let member = size_of::<IommuNestingInfoArmSmmuv3>();
                check_zero(&n.vendor.to_bytes()[member..], SMMU)?;
                if ![ARM_PGTBL_32_LPAE_S1, ARM_PGTBL_64_LPAE_S1].contains(&s.pgtbl_fmt) {
                    return Err(UapiError::field(
                        SMMU,
                        format!("page-table format {} is unknown", s.pgtbl_fmt),
                    ));
                }
                if s.asid_bits > 16 {
                    return Err(UapiError::field(
                        SMMU,
                        format!("{} ASID bits exceed 16", s.asid_bits),
                    ));
                }
            }
            other => {
                return Err(UapiError::field(
                    WHAT,
                    format!("PASID format {other} is not supported"),
                ))
            }
        }
        if u32::from(n.pasid_bits) > Pasid::BITS {
            return Err(UapiError::field(
                WHAT,
                format!("{} PASID bits exceed 20", n.pasid_bits),
            ));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::align_of;

    /// Sizes and offsets computed by hand from the C headers (x86-64: `__u64` aligned to 8).
    #[test]
    fn layouts_match_the_c_headers() {
        assert_eq!(size_of::<IommuPageResponse>(), 24);
        assert_eq!(offset_of!(IommuPageResponse, code), 20);

        assert_eq!(size_of::<IommuFaultUnrecoverable>(), 32);
        assert_eq!(offset_of!(IommuFaultUnrecoverable, flags), 4);
        assert_eq!(offset_of!(IommuFaultUnrecoverable, pasid), 8);
        assert_eq!(offset_of!(IommuFaultUnrecoverable, perm), 12);
        assert_eq!(offset_of!(IommuFaultUnrecoverable, addr), 16);
        assert_eq!(offset_of!(IommuFaultUnrecoverable, fetch_addr), 24);
        assert_eq!(size_of::<IommuFaultPageRequest>(), 40);
        assert_eq!(offset_of!(IommuFaultPageRequest, pasid), 4);
        assert_eq!(offset_of!(IommuFaultPageRequest, grpid), 8);
        assert_eq!(offset_of!(IommuFaultPageRequest, perm), 12);
        assert_eq!(offset_of!(IommuFaultPageRequest, addr), 16);
        assert_eq!(offset_of!(IommuFaultPageRequest, private_data), 24);
        // The union holds padding2[56] and members with __u64 fields: 8-aligned, at 8.
        assert_eq!(size_of::<IommuFault>(), 64);
        assert_eq!(align_of::<IommuFault>(), 8);
        assert_eq!(offset_of!(IommuFault, padding), 4);
        assert_eq!(offset_of!(IommuFault, data), 8);

        assert_eq!(size_of::<IommuInvPasidInfo>(), 16);
        assert_eq!(offset_of!(IommuInvPasidInfo, pasid), 8);
        assert_eq!(size_of::<IommuInvAddrInfo>(), 40);
        assert_eq!(offset_of!(IommuInvAddrInfo, archid), 4);
        assert_eq!(offset_of!(IommuInvAddrInfo, pasid), 8);
        assert_eq!(offset_of!(IommuInvAddrInfo, addr), 16);
        assert_eq!(offset_of!(IommuInvAddrInfo, granule_size), 24);
        assert_eq!(offset_of!(IommuInvAddrInfo, nb_granules), 32);
        // pasid_info is a prefix of addr_info: the union may be stored as addr_info.
        assert_eq!(
            offset_of!(IommuInvPasidInfo, flags),
            offset_of!(IommuInvAddrInfo, flags)
        );
        assert_eq!(
            offset_of!(IommuInvPasidInfo, archid),
            offset_of!(IommuInvAddrInfo, archid)
        );

        assert_eq!(size_of::<IommuCacheInvalidateInfo>(), 56);
        assert_eq!(align_of::<IommuCacheInvalidateInfo>(), 8);
        assert_eq!(offset_of!(IommuCacheInvalidateInfo, version), 4);
        assert_eq!(offset_of!(IommuCacheInvalidateInfo, cache), 8);
        assert_eq!(offset_of!(IommuCacheInvalidateInfo, granularity), 9);
        assert_eq!(offset_of!(IommuCacheInvalidateInfo, padding), 10);
        assert_eq!(offset_of!(IommuCacheInvalidateInfo, granu), 16);

        assert_eq!(size_of::<IommuGpasidBindDataVtd>(), 16);
        assert_eq!(offset_of!(IommuGpasidBindDataVtd, pat), 8);
        assert_eq!(offset_of!(IommuGpasidBindDataVtd, emt), 12);
        assert_eq!(size_of::<IommuGpasidBindData>(), 72);
        assert_eq!(offset_of!(IommuGpasidBindData, format), 8);
        assert_eq!(offset_of!(IommuGpasidBindData, addr_width), 12);
        assert_eq!(offset_of!(IommuGpasidBindData, flags), 16);
        assert_eq!(offset_of!(IommuGpasidBindData, gpgd), 24);
        assert_eq!(offset_of!(IommuGpasidBindData, hpasid), 32);
        assert_eq!(offset_of!(IommuGpasidBindData, gpasid), 40);
        assert_eq!(offset_of!(IommuGpasidBindData, padding), 48);
        assert_eq!(offset_of!(IommuGpasidBindData, vendor), 56);

        assert_eq!(size_of::<IommuPasidSmmuv3>(), 8);
        assert_eq!(offset_of!(IommuPasidSmmuv3, s1dss), 5);
        assert_eq!(size_of::<IommuPasidTableConfig>(), 32);
        assert_eq!(offset_of!(IommuPasidTableConfig, base_ptr), 8);
        assert_eq!(offset_of!(IommuPasidTableConfig, pasid_bits), 16);
        assert_eq!(offset_of!(IommuPasidTableConfig, config), 17);
        assert_eq!(offset_of!(IommuPasidTableConfig, padding), 18);
        assert_eq!(offset_of!(IommuPasidTableConfig, vendor_data), 24);

        assert_eq!(size_of::<IommuNestingInfoVtd>(), 32);
        assert_eq!(size_of::<IommuNestingInfoArmSmmuv3>(), 16);
        assert_eq!(offset_of!(IommuNestingInfoArmSmmuv3, asid_bits), 4);
        assert_eq!(offset_of!(IommuNestingInfoArmSmmuv3, pgtbl_fmt), 6);
        assert_eq!(offset_of!(IommuNestingInfoArmSmmuv3, padding), 7);
        assert_eq!(offset_of!(IommuNestingInfoVtd, cap_reg), 16);
        assert_eq!(offset_of!(IommuNestingInfoVtd, ecap_reg), 24);
        assert_eq!(size_of::<IommuNestingInfo>(), 64);
        assert_eq!(offset_of!(IommuNestingInfo, addr_width), 16);
        assert_eq!(offset_of!(IommuNestingInfo, pasid_bits), 18);
        assert_eq!(offset_of!(IommuNestingInfo, padding), 20);
        assert_eq!(offset_of!(IommuNestingInfo, vendor), 32);
    }

    fn bind_data(hpasid: u64) -> IommuGpasidBindData {
        IommuGpasidBindData {
            argsz: 72,
            version: 1,
            format: IOMMU_PASID_FORMAT_INTEL_VTD,
            addr_width: 48,
            flags: IOMMU_SVA_GPASID_VAL,
            gpgd: 0x1234_5000,
            hpasid,
            gpasid: 7,
            padding: [0; 8],
            vendor: IommuGpasidBindVendor {
                vtd: IommuGpasidBindDataVtd {
                    flags: IOMMU_SVA_VTD_GPASID_SRE,
                    pat: 0x0007_0406,
                    emt: 0,
                },
            },
        }
    }

    #[test]
    fn bind_data_bytes() {
        let d = bind_data(0x2_0001);
        let b = d.to_bytes();
        assert_eq!(&b[32..40], &0x2_0001u64.to_le_bytes());
        assert_eq!(b[56], 1, "vtd.flags SRE at offset 56");
        assert_eq!(IommuGpasidBindData::from_bytes(&b).unwrap(), d);
        let errno = |f: &dyn Fn(&mut IommuGpasidBindData)| {
            let mut x = d;
            f(&mut x);
            IommuGpasidBindData::from_bytes(&x.to_bytes())
                .unwrap_err()
                .errno()
        };
        assert_eq!(errno(&|x| x.argsz = 56), -libc::EINVAL);
        assert_eq!(errno(&|x| x.argsz = 55), -libc::EINVAL);
        assert_eq!(errno(&|x| x.version = 2), -libc::EINVAL);
        assert_eq!(errno(&|x| x.format = 2), -libc::EINVAL);
        assert_eq!(errno(&|x| x.flags = 2), -libc::EINVAL);
        assert_eq!(errno(&|x| x.padding[3] = 1), -libc::EINVAL);
        assert_eq!(errno(&|x| x.vendor.vtd.flags = 1 << 6), -libc::EINVAL);
        assert_eq!(errno(&|x| x.hpasid = 1 << 20), -libc::EINVAL);
        assert_eq!(errno(&|x| x.gpasid = 1 << 20), -libc::EINVAL);
        assert_eq!(errno(&|x| x.gpgd = 0x1234_5008), -libc::EINVAL);
        // Without GPASID_VAL the guest PASID is not looked at.
        let mut x = d;
        x.flags = 0;
        x.gpasid = u64::MAX;
        assert!(IommuGpasidBindData::from_bytes(&x.to_bytes()).is_ok());
        assert_eq!(
            IommuGpasidBindData::from_bytes(&b[..40])
                .unwrap_err()
                .errno(),
            -libc::EFAULT
        );
    }

    fn inv(granularity: u8, cache: u8) -> IommuCacheInvalidateInfo {
        IommuCacheInvalidateInfo {
            argsz: 56,
            version: 1,
            cache,
            granularity,
            padding: [0; 6],
            granu: IommuInvAddrInfo {
                flags: IOMMU_INV_ADDR_FLAGS_PASID,
                archid: 0,
                pasid: 5,
                addr: 0x20_0000,
                granule_size: 0x1000,
                nb_granules: 16,
            },
        }
    }

    #[test]
    fn cache_invalidate_rules() {
        let ok = |i: IommuCacheInvalidateInfo| IommuCacheInvalidateInfo::from_bytes(&i.to_bytes());
        let errno = |i| ok(i).unwrap_err().errno();
        assert!(ok(inv(IOMMU_INV_GRANU_ADDR, IOMMU_CACHE_INV_TYPE_IOTLB)).is_ok());
        assert!(ok(inv(IOMMU_INV_GRANU_PASID, 7)).is_ok());
        assert!(ok(inv(IOMMU_INV_GRANU_DOMAIN, IOMMU_CACHE_INV_TYPE_IOTLB)).is_ok());
        assert_eq!(
            errno(inv(IOMMU_INV_GRANU_DOMAIN, IOMMU_CACHE_INV_TYPE_DEV_IOTLB)),
            -libc::EINVAL
        );
        assert_eq!(
            errno(inv(IOMMU_INV_GRANU_ADDR, IOMMU_CACHE_INV_TYPE_PASID)),
            -libc::EINVAL
        );
        assert_eq!(errno(inv(3, 1)), -libc::EINVAL);
        assert_eq!(errno(inv(IOMMU_INV_GRANU_PASID, 8)), -libc::EINVAL);
        let mut i = inv(IOMMU_INV_GRANU_PASID, 1);
        i.argsz = 31;
        assert_eq!(errno(i), -libc::EINVAL);
        i.argsz = 32;
        assert!(ok(i).is_ok(), "pasid_info needs only 32 bytes");
        let mut d = inv(IOMMU_INV_GRANU_DOMAIN, 1);
        d.argsz = 16;
        assert!(ok(d).is_ok(), "domain granularity needs no union");
        d.argsz = 15;
        assert_eq!(errno(d), -libc::EINVAL);
        let mut a = inv(IOMMU_INV_GRANU_ADDR, 1);
        a.argsz = 48;
        assert_eq!(errno(a), -libc::EINVAL);
        for f in [
            |a: &mut IommuInvAddrInfo| a.addr += 0x800,
            |a: &mut IommuInvAddrInfo| a.granule_size = 0x3000,
            |a: &mut IommuInvAddrInfo| a.granule_size = 0x800,
            |a: &mut IommuInvAddrInfo| a.nb_granules = 0,
            |a: &mut IommuInvAddrInfo| a.nb_granules = u64::MAX,
            |a: &mut IommuInvAddrInfo| a.pasid = 1 << 20,
            |a: &mut IommuInvAddrInfo| a.flags = 8,
        ] {
            let mut x = inv(IOMMU_INV_GRANU_ADDR, 1);
            f(&mut x.granu);
            assert_eq!(errno(x), -libc::EINVAL, "{x:?}");
        }
        let mut top = inv(IOMMU_INV_GRANU_ADDR, 1);
        top.granu.addr = u64::MAX - 0xfff;
        top.granu.nb_granules = 1;
        assert!(
            ok(top).is_ok(),
            "the last page of the address space is valid"
        );
        let mut p = inv(IOMMU_INV_GRANU_PASID, 1);
        p.padding[5] = 1;
        assert_eq!(errno(p), -libc::EINVAL);
        p = inv(IOMMU_INV_GRANU_PASID, 1);
        p.version = 0;
        assert_eq!(errno(p), -libc::EINVAL);
    }

    #[test]
    fn pasid_info_view() {
        let mut i = inv(IOMMU_INV_GRANU_PASID, 1);
        i.set_pasid_info(IommuInvPasidInfo {
            flags: IOMMU_INV_PASID_FLAGS_PASID,
            archid: 3,
            pasid: 9,
        });
        let b = i.to_bytes();
        assert_eq!(&b[16..20], &1u32.to_le_bytes());
        assert_eq!(&b[20..24], &3u32.to_le_bytes());
        assert_eq!(&b[24..32], &9u64.to_le_bytes());
        assert_eq!(&b[32..56], &[0u8; 24]);
        assert_eq!(
            IommuCacheInvalidateInfo::from_bytes(&b)
                .unwrap()
                .pasid_info()
                .pasid,
            9
        );
    }

    #[test]
    fn pasid_table_config_rules() {
        let good = IommuPasidTableConfig {
            version: 1,
            format: IOMMU_PASID_FORMAT_SMMUV3,
            base_ptr: 0x8000_0040,
            pasid_bits: 16,
            config: IOMMU_PASID_CONFIG_TRANSLATE,
            padding: [0; 6],
            vendor_data: IommuPasidTableVendor {
                smmuv3: IommuPasidSmmuv3 {
                    version: 1,
                    s1fmt: 1,
                    s1dss: 0,
                    padding: [0; 2],
                },
            },
        };
        assert_eq!(
            IommuPasidTableConfig::from_bytes(&good.to_bytes()).unwrap(),
            good
        );
        for f in [
            |c: &mut IommuPasidTableConfig| c.version = 0,
            |c: &mut IommuPasidTableConfig| c.format = 2,
            |c: &mut IommuPasidTableConfig| c.config = 0,
            |c: &mut IommuPasidTableConfig| c.config = 4,
            |c: &mut IommuPasidTableConfig| c.pasid_bits = 21,
            |c: &mut IommuPasidTableConfig| c.padding[0] = 1,
            |c: &mut IommuPasidTableConfig| c.base_ptr = 0x8000_0020,
            |c: &mut IommuPasidTableConfig| c.vendor_data.smmuv3.s1fmt = 3,
            |c: &mut IommuPasidTableConfig| c.vendor_data.smmuv3.version = 2,
        ] {
            let mut c = good;
            f(&mut c);
            assert_eq!(
                IommuPasidTableConfig::from_bytes(&c.to_bytes())
                    .unwrap_err()
                    .errno(),
                -libc::EINVAL,
                "{c:?}"
            );
        }
        let mut abort = good;
        abort.config = IOMMU_PASID_CONFIG_ABORT;
        abort.vendor_data.smmuv3.version = 0;
        abort.base_ptr = 3;
        assert!(IommuPasidTableConfig::from_bytes(&abort.to_bytes()).is_ok());
        assert_eq!(
            IommuPasidTableConfig::from_bytes(&good.to_bytes()[..31])
                .unwrap_err()
                .errno(),
            -libc::EFAULT
        );
    }

    #[test]
    fn page_response_rules() {
        let r = IommuPageResponse {
            argsz: 24,
            version: 1,
            flags: IOMMU_PAGE_RESP_PASID_VALID,
            pasid: 0x10,
            grpid: 3,
            code: IOMMU_PAGE_RESP_INVALID,
        };
        assert_eq!(IommuPageResponse::from_bytes(&r.to_bytes()).unwrap(), r);
        for f in [
            |r: &mut IommuPageResponse| r.argsz = 20,
            |r: &mut IommuPageResponse| r.version = 2,
            |r: &mut IommuPageResponse| r.flags = 2,
            |r: &mut IommuPageResponse| r.code = 3,
            |r: &mut IommuPageResponse| r.pasid = 1 << 20,
        ] {
            let mut x = r;
            f(&mut x);
            assert_eq!(
                IommuPageResponse::from_bytes(&x.to_bytes())
                    .unwrap_err()
                    .errno(),
                -libc::EINVAL
            );
        }
    }

    fn page_request() -> IommuFaultPageRequest {
        IommuFaultPageRequest {
            flags: IOMMU_FAULT_PAGE_REQUEST_PASID_VALID
                | IOMMU_FAULT_PAGE_REQUEST_LAST_PAGE
                | IOMMU_FAULT_PAGE_REQUEST_PRIV_DATA
                | IOMMU_FAULT_PAGE_RESPONSE_NEEDS_PASID,
            pasid: 0x1_2345,
            grpid: 0x1ff,
            perm: IOMMU_FAULT_PERM_READ | IOMMU_FAULT_PERM_WRITE,
            addr: 0x7fff_f000,
            private_data: [0x1111, 0x2222],
        }
    }

    #[test]
    fn fault_record_bytes() {
        let prm = page_request();
        let f = IommuFault::from(&prm);
        let bytes = f.to_bytes();
        assert_eq!(bytes.len(), 64);
        // Each field at the offset the C layout gives it, counted from the record's start.
        assert_eq!(&bytes[..4], &IOMMU_FAULT_PAGE_REQ.to_le_bytes());
        assert_eq!(&bytes[4..8], &[0; 4]);
        assert_eq!(&bytes[8..12], &prm.flags.to_le_bytes());
        assert_eq!(&bytes[12..16], &0x1_2345u32.to_le_bytes());
        assert_eq!(&bytes[16..20], &0x1ffu32.to_le_bytes());
        assert_eq!(&bytes[20..24], &3u32.to_le_bytes());
        assert_eq!(&bytes[24..32], &0x7fff_f000u64.to_le_bytes());
        assert_eq!(&bytes[32..40], &0x1111u64.to_le_bytes());
        assert_eq!(&bytes[40..48], &0x2222u64.to_le_bytes());
        assert_eq!(&bytes[48..], &[0; 16]);
        let back = IommuFault::from_bytes(&bytes).unwrap();
        assert_eq!(back.page_request(), Some(prm));
        assert_eq!(back.unrecoverable(), None);

        let event = IommuFaultUnrecoverable {
            reason: IOMMU_FAULT_REASON_PTE_FETCH,
            flags: IOMMU_FAULT_UNRECOV_PASID_VALID | IOMMU_FAULT_UNRECOV_ADDR_VALID,
            pasid: 7,
            perm: IOMMU_FAULT_PERM_WRITE,
            addr: 0x5000,
            fetch_addr: 0,
        };
        let u = IommuFault::from_bytes(&IommuFault::from(&event).to_bytes()).unwrap();
        assert_eq!(u.unrecoverable(), Some(event));
        assert_eq!(u.page_request(), None);
    }

    #[test]
    fn fault_record_rules() {
        let good = IommuFault::from(&page_request()).to_bytes();
        assert_eq!(
            IommuFault::from_bytes(&good[..63]).unwrap_err().errno(),
            -libc::EFAULT
        );
        let mut bad_type = good;
        bad_type[0] = 3;
        let mut bad_padding = good;
        bad_padding[5] = 1;
        let mut tail = good;
        tail[60] = 1;
        for bytes in [bad_type, bad_padding, tail] {
            assert_eq!(
                IommuFault::from_bytes(&bytes).unwrap_err().errno(),
                -libc::EINVAL
            );
        }
        for f in [
            |p: &mut IommuFaultPageRequest| p.flags |= 1 << 4,
            |p: &mut IommuFaultPageRequest| p.perm = 1 << 4,
            |p: &mut IommuFaultPageRequest| p.pasid = 1 << 20,
            |p: &mut IommuFaultPageRequest| p.addr |= 0x800,
            |p: &mut IommuFaultPageRequest| p.flags &= !IOMMU_FAULT_PAGE_REQUEST_PASID_VALID,
        ] {
            let mut p = page_request();
            f(&mut p);
            assert_eq!(p.validate().unwrap_err().errno(), -libc::EINVAL, "{p:?}");
            assert_eq!(
                IommuFault::from_bytes(&IommuFault::from(&p).to_bytes())
                    .unwrap_err()
                    .errno(),
                -libc::EINVAL,
                "{p:?}"
            );
        }
        // Without a PASID and without needing one, any pasid value is ignored.
        let mut p = page_request();
        p.flags = IOMMU_FAULT_PAGE_REQUEST_LAST_PAGE;
        p.pasid = u32::MAX;
        p.validate().unwrap();
    }

    #[test]
    fn unrecoverable_fault_rules() {
        let good = IommuFaultUnrecoverable {
            reason: IOMMU_FAULT_REASON_PERMISSION,
            flags: IOMMU_FAULT_UNRECOV_PASID_VALID | IOMMU_FAULT_UNRECOV_ADDR_VALID,
            pasid: 0xf_ffff,
            perm: IOMMU_FAULT_PERM_WRITE | IOMMU_FAULT_PERM_PRIV,
            addr: 0x7000,
            fetch_addr: 0,
        };
        good.validate().unwrap();
        for f in [
            |u: &mut IommuFaultUnrecoverable| u.reason = IOMMU_FAULT_REASON_OOR_ADDRESS + 1,
            |u: &mut IommuFaultUnrecoverable| u.flags |= 1 << 3,
            |u: &mut IommuFaultUnrecoverable| u.perm |= 1 << 4,
            |u: &mut IommuFaultUnrecoverable| u.pasid = 1 << 20,
            |u: &mut IommuFaultUnrecoverable| u.flags &= !IOMMU_FAULT_UNRECOV_PASID_VALID,
            |u: &mut IommuFaultUnrecoverable| u.flags &= !IOMMU_FAULT_UNRECOV_ADDR_VALID,
            |u: &mut IommuFaultUnrecoverable| u.fetch_addr = 0x1000,
        ] {
            let mut u = good;
            f(&mut u);
            assert_eq!(u.validate().unwrap_err().errno(), -libc::EINVAL, "{u:?}");
            assert_eq!(
                IommuFault::from_bytes(&IommuFault::from(&u).to_bytes())
                    .unwrap_err()
                    .errno(),
                -libc::EINVAL,
                "{u:?}"
            );
        }
    }

    #[test]
    fn nesting_info_rules() {
        let n = IommuNestingInfo {
            argsz: 64,
            flags: 0,
            format: IOMMU_PASID_FORMAT_INTEL_VTD,
            features: IOMMU_NESTING_FEAT_BIND_PGTBL | IOMMU_NESTING_FEAT_CACHE_INVLD,
            addr_width: 48,
            pasid_bits: 20,
            padding: [0; 12],
            vendor: IommuNestingInfoVendor {
                vtd: IommuNestingInfoVtd {
                    flags: 0,
                    padding: [0; 12],
                    cap_reg: 0xd2008c106f0462,
                    ecap_reg: 0xf050da,
                },
            },
        };
        let b = n.to_bytes();
        assert_eq!(&b[48..56], &0xd2008c106f0462u64.to_le_bytes());
        assert_eq!(IommuNestingInfo::from_bytes(&b).unwrap(), n);
        let mut x = n;
        x.features = 4;
        assert_eq!(
            IommuNestingInfo::from_bytes(&x.to_bytes())
                .unwrap_err()
                .errno(),
            -libc::EINVAL
        );
        // The SMMUv3 format: the union's first 16 bytes are the SMMUv3 member.
        let smmu = IommuNestingInfoArmSmmuv3 {
            flags: 0,
            asid_bits: 16,
            pgtbl_fmt: ARM_PGTBL_64_LPAE_S1,
            padding: [0; 9],
        };
        let s = IommuNestingInfo {
            format: IOMMU_PASID_FORMAT_ARM_SMMU_V3,
            features: IOMMU_NESTING_FEAT_CACHE_INVLD,
            vendor: IommuNestingInfoVendor::from_arm_smmuv3(&smmu),
            ..n
        };
        let b = s.to_bytes();
        assert_eq!(&b[32..40], &[0, 0, 0, 0, 16, 0, 2, 0]);
        assert!(b[40..].iter().all(|&x| x == 0));
        let back = IommuNestingInfo::from_bytes(&b).unwrap();
        assert_eq!(back.vendor.arm_smmuv3(), smmu);
        let refused = |bytes: &[u8]| IommuNestingInfo::from_bytes(bytes).unwrap_err().errno();
        for (at, value) in [
            (32, 1),
            (36, 17),
            (38, 1),
            (38, 3),
            (39, 1),
            (47, 1),
            (48, 1),
        ] {
            let mut bad = b;
            bad[at] = value;
            assert_eq!(refused(&bad), -libc::EINVAL, "byte {at} = {value}");
        }
        x = n;
        x.format = IOMMU_PASID_FORMAT_LAST;
        assert_eq!(refused(&x.to_bytes()), -libc::EINVAL);
        x = n;
        x.pasid_bits = 21;
        assert_eq!(
            IommuNestingInfo::from_bytes(&x.to_bytes())
                .unwrap_err()
                .errno(),
            -libc::EINVAL
        );
    }
}
