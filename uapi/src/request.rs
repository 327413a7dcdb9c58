//! Typed views of the uAPI structures, for VMM code and the host IOMMU driver.
//!
//! Each type converts from its validated C structure (`TryFrom`, which re-checks what the
//! type promises) and to it (`From`), so the byte ABI stays the single source of truth.

use vsva_vtd::prq::PageRequestDesc;
use vsva_vtd::{addr::Gpa, addr::Iova, addr::Pasid};

use super::iommu::*;
use super::vfio::*;
use crate::error::UapiError;
use crate::wire::decode_image;

/// A DMA mapping request (`VFIO_IOMMU_MAP_DMA`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaMap {
    /// IO virtual address; for a VM, the guest physical address of the memory.
    pub iova: Iova,
    /// Address of the memory in the calling (VMM) process.
    pub vaddr: u64,
    /// Bytes, a multiple of 4 KiB.
    pub size: u64,
    /// The device may read.
    pub read: bool,
    /// The device may write.
    pub write: bool,
}

impl TryFrom<&VfioIommuType1DmaMap> for DmaMap {
    type Error = UapiError;

    fn try_from(m: &VfioIommuType1DmaMap) -> Result<Self, UapiError> {
        decode_image(m, VfioIommuType1DmaMap::from_bytes)?;
        Ok(DmaMap {
            iova: Iova(m.iova),
            vaddr: m.vaddr,
            size: m.size,
            read: m.flags & VFIO_DMA_MAP_FLAG_READ != 0,
            write: m.flags & VFIO_DMA_MAP_FLAG_WRITE != 0,
        })
    }
}

impl From<&DmaMap> for VfioIommuType1DmaMap {
    fn from(m: &DmaMap) -> Self {
        let mut flags = 0;
        if m.read {
            flags |= VFIO_DMA_MAP_FLAG_READ;
        }
        if m.write {
            flags |= VFIO_DMA_MAP_FLAG_WRITE;
        }
        VfioIommuType1DmaMap {
            argsz: std::mem::size_of::<VfioIommuType1DmaMap>() as u32,
            flags,
            vaddr: m.vaddr,
            iova: m.iova.raw(),
            size: m.size,
        }
    }
}

/// Guest page-table bind data (`iommu_gpasid_bind_data` with its VT-d part).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BindGpasid {
    /// The host PASID the device tags its requests with; must belong to the caller's set.
    pub hpasid: Pasid,
    /// The guest's PASID for the same address space, if it differs or is known.
    pub gpasid: Option<Pasid>,
    /// Guest first-level page-table base (the guest process's CR3 page), 4 KiB aligned.
    pub gpgd: Gpa,
    /// Guest virtual address width: 48 (4-level) or 57 (5-level).
    pub addr_width: u32,
    /// `IOMMU_SVA_VTD_GPASID_*` PASID-entry attributes.
    pub vtd_flags: u64,
    /// Page attribute table, for the effective memory type.
    pub pat: u32,
    /// Extended memory type.
    pub emt: u32,
}

impl TryFrom<&IommuGpasidBindData> for BindGpasid {
    type Error = UapiError;

    fn try_from(d: &IommuGpasidBindData) -> Result<Self, UapiError> {
        decode_image(d, IommuGpasidBindData::from_bytes)?;
        Ok(BindGpasid {
            hpasid: check_pasid(d.hpasid, "hpasid")?,
            gpasid: if d.flags & IOMMU_SVA_GPASID_VAL != 0 {
                Some(check_pasid(d.gpasid, "gpasid")?)
            } else {
                None
            },
            gpgd: Gpa(d.gpgd),
            addr_width: d.addr_width,
            vtd_flags: d.vendor.vtd.flags,
            pat: d.vendor.vtd.pat,
            emt: d.vendor.vtd.emt,
        })
    }
}

impl From<&BindGpasid> for IommuGpasidBindData {
    fn from(b: &BindGpasid) -> Self {
        IommuGpasidBindData {
            argsz: std::mem::size_of::<IommuGpasidBindData>() as u32,
            version: IOMMU_GPASID_BIND_VERSION_1,
            format: IOMMU_PASID_FORMAT_INTEL_VTD,
            addr_width: b.addr_width,
            flags: if b.gpasid.is_some() {
                IOMMU_SVA_GPASID_VAL
            } else {
                0
            },
            gpgd: b.gpgd.raw(),
            hpasid: b.hpasid.raw().into(),
            gpasid: b.gpasid.map_or(0, |p| p.raw().into()),
            padding: [0; 8],
            vendor: IommuGpasidBindVendor {
                vtd: IommuGpasidBindDataVtd {
                    flags: b.vtd_flags,
                    pat: b.pat,
                    emt: b.emt,
                },
            },
        }
    }
}

/// What an invalidation selects (`IOMMU_INV_GRANU_*` with its data).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InvGranularity {
    /// Everything of the container's domain.
    Domain,
    /// Everything tagged with a PASID and/or architecture id.
    Pasid {
        /// PASID, when given.
        pasid: Option<Pasid>,
        /// Architecture id, when given.
        archid: Option<u32>,
    },
    /// A range of first-level input addresses.
    Addr {
        /// PASID, when given.
        pasid: Option<Pasid>,
        /// Architecture id, when given.
        archid: Option<u32>,
        /// First address, aligned to `granule_size`.
        addr: u64,
        /// Page or block size, a power of two of at least 4 KiB.
        granule_size: u64,
        /// Number of granules, at least 1.
        nb_granules: u64,
        /// Only leaf entries changed: paging-structure caches may be kept.
        leaf: bool,
    },
}

/// A first-level cache invalidation (`iommu_cache_invalidate_info`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheInvalidate {
    /// `IOMMU_CACHE_INV_TYPE_*` bits: which caches.
    pub cache: u8,
    /// Which entries.
    pub granularity: InvGranularity,
}

impl CacheInvalidate {
    /// The PASID the invalidation names, if any.
    pub fn pasid(&self) -> Option<Pasid> {
        match self.granularity {
            InvGranularity::Domain => None,
            InvGranularity::Pasid { pasid, .. } | InvGranularity::Addr { pasid, .. } => pasid,
        }
    }
}

impl TryFrom<&IommuCacheInvalidateInfo> for CacheInvalidate {
    type Error = UapiError;

    fn try_from(i: &IommuCacheInvalidateInfo) -> Result<Self, UapiError> {
        decode_image(i, IommuCacheInvalidateInfo::from_bytes)?;
        CacheInvalidate::from_checked(i)
    }
}

impl CacheInvalidate {
    /// Decodes a `VFIO_IOMMU_CACHE_INVALIDATE` argument with the checks of
    /// [`VfioIommuType1CacheInvalidate::from_bytes`]: the same request as its `info`
    /// through `TryFrom`, with the info checked once instead of again from its image.
    pub fn from_vfio_bytes(bytes: &[u8]) -> Result<Self, UapiError> {
        let req = VfioIommuType1CacheInvalidate::from_bytes(bytes)?;
        CacheInvalidate::from_checked(&req.info)
    }

    /// The request an info that passed [`IommuCacheInvalidateInfo::from_bytes`] states.
    fn from_checked(i: &IommuCacheInvalidateInfo) -> Result<Self, UapiError> {
        let granularity = match i.granularity {
            IOMMU_INV_GRANU_DOMAIN => InvGranularity::Domain,
            IOMMU_INV_GRANU_PASID => {
                let p = i.pasid_info();
                InvGranularity::Pasid {
                    pasid: (p.flags & IOMMU_INV_PASID_FLAGS_PASID != 0)
                        .then(|| check_pasid(p.pasid, "iommu_inv_pasid_info"))
                        .transpose()?,
                    archid: (p.flags & IOMMU_INV_PASID_FLAGS_ARCHID != 0).then_some(p.archid),
                }
            }
            _ => {
                let a = &i.granu;
                InvGranularity::Addr {
                    pasid: (a.flags & IOMMU_INV_ADDR_FLAGS_PASID != 0)
                        .then(|| check_pasid(a.pasid, "iommu_inv_addr_info"))
                        .transpose()?,
                    archid: (a.flags & IOMMU_INV_ADDR_FLAGS_ARCHID != 0).then_some(a.archid),
                    addr: a.addr,
                    granule_size: a.granule_size,
                    nb_granules: a.nb_granules,
                    leaf: a.flags & IOMMU_INV_ADDR_FLAGS_LEAF != 0,
                }
            }
        };
        Ok(CacheInvalidate {
            cache: i.cache,
            granularity,
        })
    }
}

impl From<&CacheInvalidate> for IommuCacheInvalidateInfo {
    fn from(c: &CacheInvalidate) -> Self {
        let mut info = IommuCacheInvalidateInfo {
            argsz: std::mem::size_of::<IommuCacheInvalidateInfo>() as u32,
            version: IOMMU_CACHE_INVALIDATE_INFO_VERSION_1,
            cache: c.cache,
            ..Default::default()
        };
        match c.granularity {
            InvGranularity::Domain => info.granularity = IOMMU_INV_GRANU_DOMAIN,
            InvGranularity::Pasid { pasid, archid } => {
                info.granularity = IOMMU_INV_GRANU_PASID;
                info.set_pasid_info(IommuInvPasidInfo {
                    flags: pasid.map_or(0, |_| IOMMU_INV_PASID_FLAGS_PASID)
                        | archid.map_or(0, |_| IOMMU_INV_PASID_FLAGS_ARCHID),
                    archid: archid.unwrap_or(0),
                    pasid: pasid.map_or(0, |p| p.raw().into()),
                });
            }
            InvGranularity::Addr {
                pasid,
                archid,
                addr,
                granule_size,
                nb_granules,
                leaf,
            } => {
                info.granularity = IOMMU_INV_GRANU_ADDR;
                info.granu = IommuInvAddrInfo {
                    flags: pasid.map_or(0, |_| IOMMU_INV_ADDR_FLAGS_PASID)
                        | archid.map_or(0, |_| IOMMU_INV_ADDR_FLAGS_ARCHID)
                        | if leaf { IOMMU_INV_ADDR_FLAGS_LEAF } else { 0 },
                    archid: archid.unwrap_or(0),
                    pasid: pasid.map_or(0, |p| p.raw().into()),
                    addr,
                    granule_size,
                    nb_granules,
                };
            }
        }
        info
    }
}

/// What the host does with the guest stage of a guest-owned PASID table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PasidConfig {
    /// Translate through the guest's tables (`IOMMU_PASID_CONFIG_TRANSLATE`).
    Translate {
        /// STE.S1Fmt.
        s1fmt: u8,
        /// STE.S1DSS.
        s1dss: u8,
    },
    /// Bypass the guest stage (`IOMMU_PASID_CONFIG_BYPASS`).
    Bypass,
    /// Abort guest-stage transactions (`IOMMU_PASID_CONFIG_ABORT`).
    Abort,
}

/// A guest-owned PASID table (`iommu_pasid_table_config`, SMMUv3 format).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PasidTableConfig {
    /// Guest physical address of the table.
    pub base_ptr: Gpa,
    /// PASID bits the table covers (at most 20).
    pub pasid_bits: u8,
    /// Guest-stage behaviour.
    pub config: PasidConfig,
}

impl TryFrom<&IommuPasidTableConfig> for PasidTableConfig {
    type Error = UapiError;

    fn try_from(c: &IommuPasidTableConfig) -> Result<Self, UapiError> {
        decode_image(c, IommuPasidTableConfig::from_bytes)?;
        let config = match c.config {
            IOMMU_PASID_CONFIG_TRANSLATE => PasidConfig::Translate {
                s1fmt: c.vendor_data.smmuv3.s1fmt,
                s1dss: c.vendor_data.smmuv3.s1dss,
            },
            IOMMU_PASID_CONFIG_BYPASS => PasidConfig::Bypass,
            _ => PasidConfig::Abort,
        };
        Ok(PasidTableConfig {
            base_ptr: Gpa(c.base_ptr),
            pasid_bits: c.pasid_bits,
            config,
        })
    }
}

impl From<&PasidTableConfig> for IommuPasidTableConfig {
    fn from(p: &PasidTableConfig) -> Self {
        let (config, smmuv3) = match p.config {
            PasidConfig::Translate { s1fmt, s1dss } => (
                IOMMU_PASID_CONFIG_TRANSLATE,
                IommuPasidSmmuv3 {
                    version: PASID_TABLE_SMMUV3_CFG_VERSION_1,
                    s1fmt,
                    s1dss,
                    padding: [0; 2],
                },
            ),
            PasidConfig::Bypass => (IOMMU_PASID_CONFIG_BYPASS, IommuPasidSmmuv3::default()),
            PasidConfig::Abort => (IOMMU_PASID_CONFIG_ABORT, IommuPasidSmmuv3::default()),
        };
        IommuPasidTableConfig {
            version: PASID_TABLE_CFG_VERSION_1,
            format: IOMMU_PASID_FORMAT_SMMUV3,
            base_ptr: p.base_ptr.raw(),
            pasid_bits: p.pasid_bits,
            config,
            padding: [0; 6],
            vendor_data: IommuPasidTableVendor { smmuv3 },
        }
    }
}

/// The status a page response carries (`enum iommu_page_response_code`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageResponseCode {
    /// Handled: the device retries.
    Success,
    /// Not handled: the device does not retry.
    Invalid,
    /// General failure.
    Failure,
}

/// A page group response (`iommu_page_response`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageResponse {
    /// PASID of the request group, when it had one.
    pub pasid: Option<Pasid>,
    /// Page Request Group Index.
    pub grpid: u32,
    /// Outcome.
    pub code: PageResponseCode,
}

impl TryFrom<&IommuPageResponse> for PageResponse {
    type Error = UapiError;

    fn try_from(r: &IommuPageResponse) -> Result<Self, UapiError> {
        decode_image(r, IommuPageResponse::from_bytes)?;
        Ok(PageResponse {
            pasid: (r.flags & IOMMU_PAGE_RESP_PASID_VALID != 0)
                .then(|| check_pasid(r.pasid.into(), "iommu_page_response"))
                .transpose()?,
            grpid: r.grpid,
            code: match r.code {
                IOMMU_PAGE_RESP_SUCCESS => PageResponseCode::Success,
                IOMMU_PAGE_RESP_INVALID => PageResponseCode::Invalid,
                _ => PageResponseCode::Failure,
            },
        })
    }
}

impl From<&PageResponse> for IommuPageResponse {
    fn from(r: &PageResponse) -> Self {
        IommuPageResponse {
            argsz: std::mem::size_of::<IommuPageResponse>() as u32,
            version: IOMMU_PAGE_RESP_VERSION_1,
            flags: r.pasid.map_or(0, |_| IOMMU_PAGE_RESP_PASID_VALID),
            pasid: r.pasid.map_or(0, Pasid::raw),
            grpid: r.grpid,
            code: match r.code {
                PageResponseCode::Success => IOMMU_PAGE_RESP_SUCCESS,
                PageResponseCode::Invalid => IOMMU_PAGE_RESP_INVALID,
                PageResponseCode::Failure => IOMMU_PAGE_RESP_FAILURE,
            },
        }
    }
}

/// A page request (`iommu_fault_page_request`): one PCI PRI request a device sent for a
/// page it could not translate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRequest {
    /// PASID of the request, when it has one.
    pub pasid: Option<Pasid>,
    /// Page Request Group Index.
    pub grpid: u32,
    /// Read access requested.
    pub read: bool,
    /// Write access requested.
    pub write: bool,
    /// Execute access requested.
    pub exec: bool,
    /// Privileged (supervisor) access requested.
    pub privileged: bool,
    /// Page address (4 KiB aligned).
    pub addr: u64,
    /// The last request of its group: the group expects one page response.
    pub last_page: bool,
    /// The page response must carry the request's PASID.
    pub needs_pasid: bool,
    /// Device-specific private data, to be returned with the response.
    pub private_data: Option<[u64; 2]>,
}

impl TryFrom<&IommuFaultPageRequest> for PageRequest {
    type Error = UapiError;

    fn try_from(r: &IommuFaultPageRequest) -> Result<Self, UapiError> {
        r.validate()?;
        let flag = |f: u32| r.flags & f != 0;
        Ok(PageRequest {
            pasid: flag(IOMMU_FAULT_PAGE_REQUEST_PASID_VALID)
                .then(|| check_pasid(r.pasid.into(), "iommu_fault_page_request"))
                .transpose()?,
            grpid: r.grpid,
            read: r.perm & IOMMU_FAULT_PERM_READ != 0,
            write: r.perm & IOMMU_FAULT_PERM_WRITE != 0,
            exec: r.perm & IOMMU_FAULT_PERM_EXEC != 0,
            privileged: r.perm & IOMMU_FAULT_PERM_PRIV != 0,
            addr: r.addr,
            last_page: flag(IOMMU_FAULT_PAGE_REQUEST_LAST_PAGE),
            needs_pasid: flag(IOMMU_FAULT_PAGE_RESPONSE_NEEDS_PASID),
            private_data: flag(IOMMU_FAULT_PAGE_REQUEST_PRIV_DATA).then_some(r.private_data),
        })
    }
}

impl From<&PageRequest> for IommuFaultPageRequest {
    fn from(r: &PageRequest) -> Self {
        let bit = |on: bool, f: u32| if on { f } else { 0 };
        IommuFaultPageRequest {
            flags: bit(r.pasid.is_some(), IOMMU_FAULT_PAGE_REQUEST_PASID_VALID)
                | bit(r.last_page, IOMMU_FAULT_PAGE_REQUEST_LAST_PAGE)
                | bit(r.private_data.is_some(), IOMMU_FAULT_PAGE_REQUEST_PRIV_DATA)
                | bit(r.needs_pasid, IOMMU_FAULT_PAGE_RESPONSE_NEEDS_PASID),
            pasid: r.pasid.map_or(0, Pasid::raw),
            grpid: r.grpid,
            perm: bit(r.read, IOMMU_FAULT_PERM_READ)
                | bit(r.write, IOMMU_FAULT_PERM_WRITE)
                | bit(r.exec, IOMMU_FAULT_PERM_EXEC)
                | bit(r.privileged, IOMMU_FAULT_PERM_PRIV),
            addr: r.addr,
            private_data: r.private_data.unwrap_or_default(),
        }
    }
}

/// A page request of one device (a [`VfioIommuType1Fault`] record of the fault queue).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultEvent {
    /// The requesting device.
    pub sid: vsva_vtd::addr::SourceId,
    /// The request.
    pub request: PageRequest,
}

impl From<&FaultEvent> for VfioIommuType1Fault {
    fn from(e: &FaultEvent) -> Self {
        VfioIommuType1Fault {
            flags: VFIO_IOMMU_FAULT_RID_VALID,
            rid: e.sid.rid().into(),
            fault: IommuFault::from(&IommuFaultPageRequest::from(&e.request)),
        }
    }
}

/// Why an unrecoverable fault happened (`enum iommu_fault_reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnrecoverableReason {
    /// `IOMMU_FAULT_REASON_UNKNOWN`.
    Unknown,
    /// `IOMMU_FAULT_REASON_PASID_FETCH`: the PASID table could not be read.
    PasidFetch,
    /// `IOMMU_FAULT_REASON_BAD_PASID_ENTRY`: the PASID entry is invalid.
    BadPasidEntry,
    /// `IOMMU_FAULT_REASON_PASID_INVALID`: the PASID is out of range or disabled.
    PasidInvalid,
    /// `IOMMU_FAULT_REASON_WALK_EABT`: reading a paging entry aborted.
    WalkEabt,
    /// `IOMMU_FAULT_REASON_PTE_FETCH`: no valid paging entry (a translation fault).
    PteFetch,
    /// `IOMMU_FAULT_REASON_PERMISSION`: the entry does not allow the access.
    Permission,
    /// `IOMMU_FAULT_REASON_ACCESS`: an access-flag check failed.
    Access,
    /// `IOMMU_FAULT_REASON_OOR_ADDRESS`: an address is out of range.
    OorAddress,
}

impl UnrecoverableReason {
    const ALL: [(UnrecoverableReason, u32); 9] = [
        (UnrecoverableReason::Unknown, IOMMU_FAULT_REASON_UNKNOWN),
        (
            UnrecoverableReason::PasidFetch,
            IOMMU_FAULT_REASON_PASID_FETCH,
        ),
        (
            UnrecoverableReason::BadPasidEntry,
            IOMMU_FAULT_REASON_BAD_PASID_ENTRY,
        ),
        (
            UnrecoverableReason::PasidInvalid,
            IOMMU_FAULT_REASON_PASID_INVALID,
        ),
        (UnrecoverableReason::WalkEabt, IOMMU_FAULT_REASON_WALK_EABT),
        (UnrecoverableReason::PteFetch, IOMMU_FAULT_REASON_PTE_FETCH),
        (
            UnrecoverableReason::Permission,
            IOMMU_FAULT_REASON_PERMISSION,
        ),
        (UnrecoverableReason::Access, IOMMU_FAULT_REASON_ACCESS),
        (
            UnrecoverableReason::OorAddress,
            IOMMU_FAULT_REASON_OOR_ADDRESS,
        ),
    ];

    /// The `IOMMU_FAULT_REASON_*` value.
    pub fn raw(self) -> u32 {
        Self::ALL
            .iter()
            .find(|(r, _)| *r == self)
            .map_or(IOMMU_FAULT_REASON_UNKNOWN, |&(_, raw)| raw)
    }

    /// The reason an `IOMMU_FAULT_REASON_*` value names.
    pub fn from_raw(raw: u32) -> Option<Self> {
        Self::ALL.iter().find(|(_, v)| *v == raw).map(|&(r, _)| r)
    }
}

/// An unrecoverable fault (`iommu_fault_unrecoverable`): a DMA request of a device that
/// the IOMMU refused and recorded, and that no page request can resolve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnrecoverableFault {
    /// Why.
    pub reason: UnrecoverableReason,
    /// PASID of the request, when it had one (`IOMMU_FAULT_UNRECOV_PASID_VALID`).
    pub pasid: Option<Pasid>,
    /// The request read.
    pub read: bool,
    /// The request wrote.
    pub write: bool,
    /// The request was an instruction fetch.
    pub exec: bool,
    /// The request was privileged (supervisor).
    pub privileged: bool,
    /// The faulting page address (`IOMMU_FAULT_UNRECOV_ADDR_VALID`).
    pub addr: Option<u64>,
    /// The address whose fetch aborted (`IOMMU_FAULT_UNRECOV_FETCH_ADDR_VALID`).
    pub fetch_addr: Option<u64>,
}

impl TryFrom<&IommuFaultUnrecoverable> for UnrecoverableFault {
    type Error = UapiError;

    fn try_from(u: &IommuFaultUnrecoverable) -> Result<Self, UapiError> {
        u.validate()?;
        let flag = |f: u32| u.flags & f != 0;
        Ok(UnrecoverableFault {
            reason: UnrecoverableReason::from_raw(u.reason)
                .ok_or_else(|| UapiError::field("iommu_fault_unrecoverable", "undefined reason"))?,
            pasid: flag(IOMMU_FAULT_UNRECOV_PASID_VALID)
                .then(|| check_pasid(u.pasid.into(), "iommu_fault_unrecoverable"))
                .transpose()?,
            read: u.perm & IOMMU_FAULT_PERM_READ != 0,
            write: u.perm & IOMMU_FAULT_PERM_WRITE != 0,
            exec: u.perm & IOMMU_FAULT_PERM_EXEC != 0,
            privileged: u.perm & IOMMU_FAULT_PERM_PRIV != 0,
            addr: flag(IOMMU_FAULT_UNRECOV_ADDR_VALID).then_some(u.addr),
            fetch_addr: flag(IOMMU_FAULT_UNRECOV_FETCH_ADDR_VALID).then_some(u.fetch_addr),
        })
    }
}

impl From<&UnrecoverableFault> for IommuFaultUnrecoverable {
    fn from(f: &UnrecoverableFault) -> Self {
        let bit = |on: bool, b: u32| if on { b } else { 0 };
        IommuFaultUnrecoverable {
            reason: f.reason.raw(),
            flags: bit(f.pasid.is_some(), IOMMU_FAULT_UNRECOV_PASID_VALID)
                | bit(f.addr.is_some(), IOMMU_FAULT_UNRECOV_ADDR_VALID)
                | bit(f.fetch_addr.is_some(), IOMMU_FAULT_UNRECOV_FETCH_ADDR_VALID),
            pasid: f.pasid.map_or(0, Pasid::raw),
            perm: bit(f.read, IOMMU_FAULT_PERM_READ)
                | bit(f.write, IOMMU_FAULT_PERM_WRITE)
                | bit(f.exec, IOMMU_FAULT_PERM_EXEC)
                | bit(f.privileged, IOMMU_FAULT_PERM_PRIV),
            addr: f.addr.unwrap_or(0),
            fetch_addr: f.fetch_addr.unwrap_or(0),
        }
    }
}

/// An unrecoverable fault of one device (a [`VfioIommuType1Fault`] record of the fault
/// queue).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnrecoverableEvent {
    /// The device whose request faulted.
    pub sid: vsva_vtd::addr::SourceId,
    /// The fault.
    pub fault: UnrecoverableFault,
}

/// One record of a container's fault queue, as `read` returns them in the order they were
/// reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueuedFault {
    /// A page request (`IOMMU_FAULT_PAGE_REQ`).
    PageRequest(FaultEvent),
    /// An unrecoverable fault (`IOMMU_FAULT_DMA_UNRECOV`).
    Unrecoverable(UnrecoverableEvent),
}

impl From<&QueuedFault> for VfioIommuType1Fault {
    fn from(q: &QueuedFault) -> Self {
        match q {
            QueuedFault::PageRequest(e) => VfioIommuType1Fault::from(e),
            QueuedFault::Unrecoverable(e) => VfioIommuType1Fault {
                flags: VFIO_IOMMU_FAULT_RID_VALID,
                rid: e.sid.rid().into(),
                fault: IommuFault::from(&IommuFaultUnrecoverable::from(&e.fault)),
            },
        }
    }
}

impl TryFrom<&VfioIommuType1Fault> for QueuedFault {
    type Error = UapiError;

    fn try_from(r: &VfioIommuType1Fault) -> Result<Self, UapiError> {
        QueuedFault::from_checked(&decode_image(r, VfioIommuType1Fault::from_bytes)?)
    }
}

impl QueuedFault {
    /// Decodes one record `read` from a fault queue with the checks of
    /// [`VfioIommuType1Fault::from_bytes`]: the same fault as the record through
    /// `TryFrom`, with the record checked once instead of again from its image.
    pub fn from_record_bytes(bytes: &[u8]) -> Result<Self, UapiError> {
        QueuedFault::from_checked(&VfioIommuType1Fault::from_bytes(bytes)?)
    }

    /// The fault a record that passed [`VfioIommuType1Fault::from_bytes`] states.
    fn from_checked(r: &VfioIommuType1Fault) -> Result<Self, UapiError> {
        let sid = vsva_vtd::addr::SourceId::from_rid(r.rid as u16);
        if let Some(prm) = r.fault.page_request() {
            return Ok(QueuedFault::PageRequest(FaultEvent {
                sid,
                request: PageRequest::try_from(&prm)?,
            }));
        }
        let event = r
            .fault
            .unrecoverable()
            .ok_or_else(|| UapiError::field("vfio_iommu_type1_fault", "undefined fault type"))?;
        Ok(QueuedFault::Unrecoverable(UnrecoverableEvent {
            sid,
            fault: UnrecoverableFault::try_from(&event)?,
        }))
    }
}

/// The report of a VT-d page request descriptor (§7.5.1.1), as the Linux VT-d driver makes
/// it (`intel_svm_prq_report`): a request with a PASID needs the PASID back in its response,
/// and a request with private data (PDP) is reported as the last of its group even with
/// LPIG clear, since hardware waits for a response to it as well (§7.5.1) and the
/// response must return the data.
impl From<&PageRequestDesc> for PageRequest {
    fn from(d: &PageRequestDesc) -> Self {
        PageRequest {
            pasid: d.pasid,
            grpid: d.prg_index.into(),
            read: d.read,
            write: d.write,
            exec: d.exe,
            privileged: d.pm,
            addr: d.addr,
            last_page: d.lpig || d.private_data.is_some(),
            needs_pasid: d.pasid.is_some(),
            private_data: d.private_data,
        }
    }
}

/// What a nesting-capable host IOMMU offers (`iommu_nesting_info`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NestingInfo {
    /// `IOMMU_NESTING_FEAT_*`.
    pub features: u32,
    /// First-level (stage-1) output address width.
    pub addr_width: u16,
    /// PASID (SubstreamID) bits supported.
    pub pasid_bits: u16,
    /// The format and its vendor data.
    pub vendor: NestingVendor,
}

/// The format of a nesting report and its vendor data (`iommu_nesting_info.format` and
/// `vendor`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NestingVendor {
    /// `IOMMU_PASID_FORMAT_INTEL_VTD`: the VT-d registers a vIOMMU mirrors.
    IntelVtd {
        /// Capability register.
        cap_reg: u64,
        /// Extended capability register.
        ecap_reg: u64,
    },
    /// `IOMMU_PASID_FORMAT_ARM_SMMU_V3`: what guest CDs and stage-1 tables must fit.
    ArmSmmuV3 {
        /// ASID bits.
        asid_bits: u16,
        /// Stage-1 table format (`ARM_PGTBL_*`).
        pgtbl_fmt: u8,
    },
}

impl TryFrom<&IommuNestingInfo> for NestingInfo {
    type Error = UapiError;

    fn try_from(n: &IommuNestingInfo) -> Result<Self, UapiError> {
        decode_image(n, IommuNestingInfo::from_bytes)?;
        let vendor = if n.format == IOMMU_PASID_FORMAT_ARM_SMMU_V3 {
            let s = n.vendor.arm_smmuv3();
            NestingVendor::ArmSmmuV3 {
                asid_bits: s.asid_bits,
                pgtbl_fmt: s.pgtbl_fmt,
            }
        } else {
            NestingVendor::IntelVtd {
                cap_reg: n.vendor.vtd.cap_reg,
                ecap_reg: n.vendor.vtd.ecap_reg,
            }
        };
        Ok(NestingInfo {
            features: n.features,
            addr_width: n.addr_width,
            pasid_bits: n.pasid_bits,
            vendor,
        })
    }
}

impl From<&NestingInfo> for IommuNestingInfo {
    fn from(n: &NestingInfo) -> Self {
        let (format, vendor) = match n.vendor {
            NestingVendor::IntelVtd { cap_reg, ecap_reg } => (
                IOMMU_PASID_FORMAT_INTEL_VTD,
                IommuNestingInfoVendor {
                    vtd: IommuNestingInfoVtd {
                        flags: 0,
                        padding: [0; 12],
                        cap_reg,
                        ecap_reg,
                    },
                },
            ),
            NestingVendor::ArmSmmuV3 {
                asid_bits,
                pgtbl_fmt,
            } => (
                IOMMU_PASID_FORMAT_ARM_SMMU_V3,
                IommuNestingInfoVendor::from_arm_smmuv3(&IommuNestingInfoArmSmmuv3 {
                    flags: 0,
                    asid_bits,
                    pgtbl_fmt,
                    padding: [0; 9],
                }),
            ),
        };
        IommuNestingInfo {
            argsz: std::mem::size_of::<IommuNestingInfo>() as u32,
            flags: 0,
            format,
            features: n.features,
            addr_width: n.addr_width,
            pasid_bits: n.pasid_bits,
            padding: [0; 12],
            vendor,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pasid() -> impl Strategy<Value = Pasid> {
        (0u32..1 << 20).prop_map(|p| Pasid::new(p).unwrap())
    }

    fn page_request() -> impl Strategy<Value = PageRequest> {
        (
            proptest::option::of(pasid()),
            any::<u32>(),
            any::<[bool; 6]>(),
            0u64..1 << 52,
            proptest::option::of(any::<[u64; 2]>()),
        )
            .prop_map(|(pasid, grpid, b, page, private_data)| PageRequest {
                pasid,
                grpid,
                read: b[0],
                write: b[1],
                exec: b[2],
                privileged: b[3],
                addr: page << 12,
                last_page: b[4],
                needs_pasid: b[5] && pasid.is_some(),
                private_data,
            })
    }

    #[test]
    fn page_request_from_vtd_descriptor() {
        let d = PageRequestDesc {
            rid: vsva_vtd::addr::SourceId::new(0, 3, 0).unwrap(),
            pasid: Some(Pasid::new(0x22).unwrap()),
            exe: false,
            pm: true,
            read: true,
            write: true,
            lpig: true,
            prg_index: 0x1a5,
            addr: 0x7f12_3456_7000,
            private_data: None,
        };
        let r = PageRequest::from(&d);
        assert_eq!(r.pasid, d.pasid);
        assert_eq!(r.grpid, 0x1a5);
        assert!(r.read && r.write && r.privileged && !r.exec);
        assert!(r.last_page && r.needs_pasid);
        assert_eq!((r.addr, r.private_data), (0x7f12_3456_7000, None));
        let no_pasid = PageRequest::from(&PageRequestDesc {
            pasid: None,
            lpig: false,
            private_data: Some([1, 2]),
            ..d
        });
        // Private data present: a response is due, so the group is reported as ending
        // here, LPIG clear or not (`intel_svm_prq_report`).
        assert!(!no_pasid.needs_pasid && no_pasid.last_page);
        assert_eq!(no_pasid.private_data, Some([1, 2]));
        IommuFaultPageRequest::from(&no_pasid).validate().unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn queued_faults_round_trip(
            rid in any::<u16>(),
            r in page_request(),
            reason in 0u32..=IOMMU_FAULT_REASON_OOR_ADDRESS,
            pasid in proptest::option::of(pasid()),
            perm in any::<[bool; 4]>(),
            addr in proptest::option::of(any::<u64>()),
            fetch_addr in proptest::option::of(any::<u64>()),
        ) {
            let sid = vsva_vtd::addr::SourceId::from_rid(rid);
            let fault = UnrecoverableFault {
                reason: UnrecoverableReason::from_raw(reason).unwrap(),
                pasid,
                read: perm[0],
                write: perm[1],
                exec: perm[2],
                privileged: perm[3],
                addr,
                fetch_addr,
            };
            prop_assert_eq!(fault.reason.raw(), reason);
            for q in [
                QueuedFault::PageRequest(FaultEvent { sid, request: r }),
                QueuedFault::Unrecoverable(UnrecoverableEvent { sid, fault }),
            ] {
                let raw = VfioIommuType1Fault::from(&q);
                let bytes = raw.to_bytes();
                let decoded = VfioIommuType1Fault::from_bytes(&bytes).unwrap();
                prop_assert_eq!(QueuedFault::try_from(&decoded).unwrap(), q);
                prop_assert_eq!(QueuedFault::from_record_bytes(&bytes).unwrap(), q);
            }
        }

        /// A fault record's one-check decode answers as the structure's decode and
        /// `TryFrom` do, for records with any byte changed and any length.
        #[test]
        fn fault_record_decodes_as_try_from(r in page_request(), rid: u16, at in 0usize..128,
                                            byte: u8, len in 0usize..160) {
            let q = QueuedFault::PageRequest(FaultEvent { sid: vsva_vtd::addr::SourceId::from_rid(rid), request: r });
            let mut bytes = VfioIommuType1Fault::from(&q).to_bytes().to_vec();
            let i = at % bytes.len();
            bytes[i] = byte;
            bytes.truncate(len);
            let two_checks = VfioIommuType1Fault::from_bytes(&bytes)
                .and_then(|r| QueuedFault::try_from(&r));
            let one_check = QueuedFault::from_record_bytes(&bytes);
            prop_assert_eq!(one_check.as_ref().ok(), two_checks.as_ref().ok());
            prop_assert_eq!(one_check.err().map(|e| e.errno()), two_checks.err().map(|e| e.errno()));
        }

        #[test]
        fn page_request_round_trips(r in page_request()) {
            let raw = IommuFaultPageRequest::from(&r);
            prop_assert_eq!(PageRequest::try_from(&raw).unwrap(), r);
            let f = crate::iommu::IommuFault::from(&raw);
            let back = crate::iommu::IommuFault::from_bytes(&f.to_bytes()).unwrap();
            prop_assert_eq!(back.page_request(), Some(raw));
        }

        #[test]
        fn bind_round_trips(hp in pasid(), gp in proptest::option::of(pasid()), page in 0u64..1 << 40,
                            aw in prop_oneof![Just(48u32), Just(57u32)], flags in 0u64..64, pat: u32, emt: u32) {
            let b = BindGpasid { hpasid: hp, gpasid: gp, gpgd: Gpa(page << 12), addr_width: aw, vtd_flags: flags, pat, emt };
            let raw = IommuGpasidBindData::from(&b);
            let decoded = IommuGpasidBindData::from_bytes(&raw.to_bytes()).unwrap();
            prop_assert_eq!(BindGpasid::try_from(&decoded).unwrap(), b);
        }

        #[test]
        fn invalidate_round_trips(p in proptest::option::of(pasid()), archid in proptest::option::of(any::<u32>()),
                                  shift in 12u32..40, page in 0u64..1 << 20, n in 1u64..512, leaf: bool, kind in 0u8..3) {
            let (cache, granularity) = match kind {
                0 => (IOMMU_CACHE_INV_TYPE_IOTLB | IOMMU_CACHE_INV_TYPE_PASID, InvGranularity::Domain),
                1 => (7, InvGranularity::Pasid { pasid: p, archid }),
                _ => (3, InvGranularity::Addr { pasid: p, archid, addr: page << shift, granule_size: 1 << shift, nb_granules: n, leaf }),
            };
            let c = CacheInvalidate { cache, granularity };
            let raw = IommuCacheInvalidateInfo::from(&c);
            let decoded = IommuCacheInvalidateInfo::from_bytes(&raw.to_bytes()).unwrap();
            prop_assert_eq!(CacheInvalidate::try_from(&decoded).unwrap(), c);
        }

        /// The ioctl's one-check decode answers as the structure's decode and `TryFrom`
        /// do, for requests with any byte changed and any length.
        #[test]
        fn vfio_invalidate_decodes_as_try_from(p in proptest::option::of(pasid()), n in 1u64..512, kind in 0u8..3,
                                               at in 0usize..64, byte: u8, len in 0usize..72) {
            let granularity = match kind {
                0 => InvGranularity::Domain,
                1 => InvGranularity::Pasid { pasid: p, archid: None },
                _ => InvGranularity::Addr { pasid: p, archid: None, addr: 0x40_0000, granule_size: 0x1000, nb_granules: n, leaf: true },
            };
            let c = CacheInvalidate { cache: if kind == 0 { 1 } else { 3 }, granularity };
            let req = VfioIommuType1CacheInvalidate {
                argsz: std::mem::size_of::<VfioIommuType1CacheInvalidate>() as u32,
                flags: 0,
                info: IommuCacheInvalidateInfo::from(&c),
            };
            let mut bytes = req.to_bytes().to_vec();
            prop_assert_eq!(CacheInvalidate::from_vfio_bytes(&bytes).unwrap(), c);
            let i = at % bytes.len();
            bytes[i] = byte;
            bytes.truncate(len);
            let two_checks = VfioIommuType1CacheInvalidate::from_bytes(&bytes)
                .and_then(|r| CacheInvalidate::try_from(&r.info));
            let one_check = CacheInvalidate::from_vfio_bytes(&bytes);
            prop_assert_eq!(one_check.as_ref().ok(), two_checks.as_ref().ok());
            prop_assert_eq!(one_check.err().map(|e| e.errno()), two_checks.err().map(|e| e.errno()));
        }
    }

    #[test]
    fn other_round_trips() {
        let m = DmaMap {
            iova: Iova(0x4000),
            vaddr: 0x7000_0000,
            size: 0x3000,
            read: true,
            write: false,
        };
        let raw = VfioIommuType1DmaMap::from(&m);
        assert_eq!(raw.flags, VFIO_DMA_MAP_FLAG_READ);
        assert_eq!(DmaMap::try_from(&raw).unwrap(), m);

        for config in [
            PasidConfig::Translate { s1fmt: 2, s1dss: 1 },
            PasidConfig::Bypass,
            PasidConfig::Abort,
        ] {
            let t = PasidTableConfig {
                base_ptr: Gpa(0x9000),
                pasid_bits: 20,
                config,
            };
            let raw = IommuPasidTableConfig::from(&t);
            assert_eq!(PasidTableConfig::try_from(&raw).unwrap(), t);
        }

        let r = PageResponse {
            pasid: Some(Pasid::new(9).unwrap()),
            grpid: 511,
            code: PageResponseCode::Failure,
        };
        assert_eq!(
            PageResponse::try_from(&IommuPageResponse::from(&r)).unwrap(),
            r
        );

        let req = PageRequest {
            pasid: Some(Pasid::new(0x4_0001).unwrap()),
            grpid: 17,
            read: true,
            write: false,
            exec: true,
            privileged: false,
            addr: 0x1234_5000,
            last_page: true,
            needs_pasid: true,
            private_data: Some([5, 6]),
        };
        let raw = IommuFaultPageRequest::from(&req);
        assert_eq!(
            raw.perm,
            IOMMU_FAULT_PERM_READ | IOMMU_FAULT_PERM_EXEC,
            "{raw:?}"
        );
        assert_eq!(PageRequest::try_from(&raw).unwrap(), req);
        let bare = PageRequest {
            pasid: None,
            needs_pasid: false,
            private_data: None,
            ..req
        };
        assert_eq!(
            IommuFaultPageRequest::from(&bare).flags,
            IOMMU_FAULT_PAGE_REQUEST_LAST_PAGE
        );
        assert_eq!(
            PageRequest::try_from(&IommuFaultPageRequest::from(&bare)).unwrap(),
            bare
        );

        let n = NestingInfo {
            features: IOMMU_NESTING_FEAT_BIND_PGTBL,
            addr_width: 48,
            pasid_bits: 20,
            vendor: NestingVendor::IntelVtd {
                cap_reg: 1,
                ecap_reg: 2,
            },
        };
        let smmu = NestingInfo {
            features: IOMMU_NESTING_FEAT_CACHE_INVLD,
            addr_width: 48,
            pasid_bits: 20,
            vendor: NestingVendor::ArmSmmuV3 {
                asid_bits: 16,
                pgtbl_fmt: ARM_PGTBL_64_LPAE_S1,
            },
        };
        assert_eq!(
            NestingInfo::try_from(&IommuNestingInfo::from(&smmu)).unwrap(),
            smmu
        );
        assert_eq!(
            NestingInfo::try_from(&IommuNestingInfo::from(&n)).unwrap(),
            n
        );
    }

    #[test]
    fn typed_values_out_of_range_are_refused() {
        let mut m = VfioIommuType1DmaMap::from(&DmaMap {
            iova: Iova(0x4001),
            vaddr: 0,
            size: 0x1000,
            read: true,
            write: true,
        });
        assert_eq!(DmaMap::try_from(&m).unwrap_err().errno(), -libc::EINVAL);
        m.iova = 0x4000;
        assert!(DmaMap::try_from(&m).is_ok());
        let c = CacheInvalidate {
            cache: IOMMU_CACHE_INV_TYPE_DEV_IOTLB,
            granularity: InvGranularity::Domain,
        };
        assert_eq!(
            CacheInvalidate::try_from(&IommuCacheInvalidateInfo::from(&c))
                .unwrap_err()
                .errno(),
            -libc::EINVAL
        );
    }
}
