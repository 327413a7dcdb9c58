//! Nested translation for guests (VT-d §3.8): the PASID entry of a bound guest page table,
//! and the translation of a guest's first-level cache invalidation into descriptors.
//!
//! Both follow intel-iommu with the seed series: `intel_pasid_setup_nested` with
//! `intel_pasid_setup_bind_data`, and `intel_iommu_sva_invalidate` with its granularity
//! table.

use vsva_vtd::regs::{Cap, Ecap};
use vsva_vtd::{DomainId, FlPagingMode, InvDesc, Pasid, PasidEntry, Pgtt, SlLevels, SourceId};

use super::error::DriverError;
use super::inv::{dev_iotlb, piotlb_pages, piotlb_pasid, size_order, WHOLE_SPACE};
use crate::uapi::iommu::{
    IOMMU_CACHE_INV_TYPE_DEV_IOTLB, IOMMU_CACHE_INV_TYPE_IOTLB, IOMMU_CACHE_INV_TYPE_NR,
    IOMMU_SVA_VTD_GPASID_CD, IOMMU_SVA_VTD_GPASID_EAFE, IOMMU_SVA_VTD_GPASID_EMTE,
    IOMMU_SVA_VTD_GPASID_LAST, IOMMU_SVA_VTD_GPASID_MTS_MASK, IOMMU_SVA_VTD_GPASID_PCD,
    IOMMU_SVA_VTD_GPASID_PWT, IOMMU_SVA_VTD_GPASID_SRE,
};
use crate::uapi::request::{BindGpasid, CacheInvalidate, InvGranularity};

/// The guest address width of 4-level first-level paging (`ADDR_WIDTH_4LEVEL`).
pub const ADDR_WIDTH_4LEVEL: u32 = 48;
/// The guest address width of 5-level first-level paging (`ADDR_WIDTH_5LEVEL`).
pub const ADDR_WIDTH_5LEVEL: u32 = 57;

/// The second level a nested entry walks the guest's table through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SecondLevel {
    pub did: DomainId,
    /// SLPTPTR.
    pub root: u64,
    pub levels: SlLevels,
}

/// The nested PASID entry for a bind (PGTT = nested, FLPTPTR = the guest's table root,
/// a GPA; SLPTPTR, DID, AW from the domain; FLPM from the guest address width), or the
/// error intel-iommu gives: no nesting support (ENODEV), an address width other than 48
/// or 57 (5-level without CAP.FL5LP), a root the second level cannot translate, or a flag
/// the unit does not support (SRE without ECAP.SRS, EAFE without EAFS, memory-type flags
/// without MTS) (EINVAL).
///
/// Execution controls (ERE, NXE, SMEP, WPE) are not part of the bind data and stay clear;
/// PWSNP follows ECAP.SMPWC, as for every entry intel-iommu writes.
pub(crate) fn nested_entry(
    bind: &BindGpasid,
    sl: &SecondLevel,
    cap: &Cap,
    ecap: &Ecap,
) -> Result<PasidEntry, DriverError> {
    const WHAT: &str = "guest PASID bind";
    if !ecap.nest || !ecap.flts {
        return Err(DriverError::Unsupported("nested translation"));
    }
    if bind.hpasid.raw() == 0 {
        return Err(DriverError::invalid(WHAT, "PASID 0 is RID_PASID"));
    }
    let flpm = match bind.addr_width {
        ADDR_WIDTH_4LEVEL => FlPagingMode::FourLevel,
        ADDR_WIDTH_5LEVEL if cap.fl5lp => FlPagingMode::FiveLevel,
        ADDR_WIDTH_5LEVEL => {
            return Err(DriverError::invalid(
                WHAT,
                "5-level paging is not supported",
            ))
        }
        w => {
            return Err(DriverError::invalid(
                WHAT,
                format!("guest address width {w} (48 or 57)"),
            ))
        }
    };
    if bind.gpgd.raw() >> sl.levels.input_width() != 0 || !bind.gpgd.is_aligned(4096) {
        return Err(DriverError::invalid(
            WHAT,
            format!(
                "guest page table {} is beyond the {}-bit second level or unaligned",
                bind.gpgd,
                sl.levels.input_width()
            ),
        ));
    }
    let flags = bind.vtd_flags;
    if flags & !(IOMMU_SVA_VTD_GPASID_LAST - 1) != 0 {
        return Err(DriverError::invalid(
            WHAT,
            format!("unknown VT-d flags {flags:#x}"),
        ));
    }
    let has = |f: u64| flags & f != 0;
    if has(IOMMU_SVA_VTD_GPASID_SRE) && !ecap.srs {
        return Err(DriverError::invalid(WHAT, "no supervisor request support"));
    }
    if has(IOMMU_SVA_VTD_GPASID_EAFE) && !ecap.eafs {
        return Err(DriverError::invalid(
            WHAT,
            "no extended access flag support",
        ));
    }
    let memory_type = has(IOMMU_SVA_VTD_GPASID_MTS_MASK);
    if memory_type && !ecap.mts {
        return Err(DriverError::invalid(WHAT, "no memory type support"));
    }
    let emte = has(IOMMU_SVA_VTD_GPASID_EMTE);
    let emt = if emte {
        u8::try_from(bind.emt)
            .ok()
            .filter(|e| *e < 8)
            .ok_or_else(|| DriverError::invalid(WHAT, format!("EMT {} is not 3 bits", bind.emt)))?
    } else {
        0
    };
    Ok(PasidEntry {
        fpd: false,
        aw: sl.levels,
        slee: false,
        pgtt: Pgtt::Nested,
        slade: false,
        slptptr: sl.root,
        did: sl.did,
        pwsnp: ecap.smpwcs,
        pgsnp: false,
        cd: has(IOMMU_SVA_VTD_GPASID_CD),
        emte,
        emt,
        pwt: has(IOMMU_SVA_VTD_GPASID_PWT),
        pcd: has(IOMMU_SVA_VTD_GPASID_PCD),
        pat: if memory_type { bind.pat } else { 0 },
        sre: has(IOMMU_SVA_VTD_GPASID_SRE),
        ere: false,
        flpm,
        wpe: false,
        nxe: false,
        smep: false,
        eafe: has(IOMMU_SVA_VTD_GPASID_EAFE),
        flptptr: bind.gpgd.raw(),
    })
}

/// The VT-d invalidation one (cache type, granularity) pair asks for, from the v5.10
/// `inv_type_granu_table`: the guest's vIOMMU exposes first-level tables only, so IOTLB
/// invalidations are PASID-based (PASID-selective or page-selective within the PASID),
/// device-TLB invalidations go by address, and the PASID cache, which the host owns, is
/// never invalidated on a guest's behalf; domain granularity is refused for all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Planned {
    PasidIotlb,
    PasidIotlbPages(Pages),
    DevIotlbPages(Pages),
}

/// A naturally aligned block of `2^order` pages at `addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pages {
    addr: u64,
    order: u8,
    leaf: bool,
}

fn plan(cache_type: u8, inv: &InvGranularity) -> Result<Planned, DriverError> {
    let pages = |aligned: bool| -> Result<Pages, DriverError> {
        let InvGranularity::Addr {
            addr,
            granule_size,
            nb_granules,
            leaf,
            ..
        } = *inv
        else {
            return Err(bad_combination(cache_type, inv));
        };
        let bytes = granule_size
            .checked_mul(nb_granules)
            .ok_or_else(|| DriverError::invalid("cache invalidation", "address range overflows"))?;
        let order = size_order(bytes);
        let mask = 1u64
            .checked_shl(12 + u32::from(order))
            .map_or(u64::MAX, |block| block - 1);
        if aligned && addr & mask != 0 {
            return Err(DriverError::Misaligned {
                addr,
                pages: 1u64.checked_shl(order.into()).unwrap_or(u64::MAX),
            });
        }
        Ok(Pages { addr, order, leaf })
    };
    match (cache_type, inv) {
        (IOMMU_CACHE_INV_TYPE_IOTLB, InvGranularity::Pasid { .. }) => Ok(Planned::PasidIotlb),
        (IOMMU_CACHE_INV_TYPE_IOTLB, InvGranularity::Addr { .. }) => {
            Ok(Planned::PasidIotlbPages(pages(true)?))
        }
        (IOMMU_CACHE_INV_TYPE_DEV_IOTLB, InvGranularity::Addr { .. }) => {
            Ok(Planned::DevIotlbPages(pages(false)?))
        }
        _ => Err(bad_combination(cache_type, inv)),
    }
}

fn bad_combination(cache_type: u8, inv: &InvGranularity) -> DriverError {
    let name = match cache_type {
        IOMMU_CACHE_INV_TYPE_IOTLB => "IOTLB",
        IOMMU_CACHE_INV_TYPE_DEV_IOTLB => "DEV_IOTLB",
        _ => "PASID",
    };
    let granularity = match inv {
        InvGranularity::Domain => "DOMAIN",
        InvGranularity::Pasid { .. } => "PASID",
        InvGranularity::Addr { .. } => "ADDR",
    };
    DriverError::invalid(
        "cache invalidation",
        format!("cache type {name} with {granularity} granularity"),
    )
}

/// The descriptors that carry out a guest's invalidation `inv` in domain `did` with the
/// devices `devices` (all with device TLBs), as `intel_iommu_sva_invalidate` issues them:
///
/// | cache type \ granularity | DOMAIN | PASID                   | ADDR                        |
/// |--------------------------|--------|-------------------------|-----------------------------|
/// | IOTLB                    | EINVAL | P_IOTLB PASID-selective | P_IOTLB page-selective (AM) |
/// | DEV_IOTLB                | EINVAL | EINVAL                  | P_DEV_IOTLB (ATS size)      |
/// | PASID                    | EINVAL | EINVAL                  | EINVAL                      |
///
/// An IOTLB invalidation also invalidates the device TLBs (the vIOMMU may take IOTLB
/// invalidation as inclusive); with PASID granularity their whole range. The range of
/// ADDR granularity is rounded up to a power of two of pages, which the address must be
/// aligned to for the IOTLB (ERANGE). Without a PASID, PASID 0 is used, as in Linux.
/// A refused combination fails the whole call before anything is issued (Linux stops
/// silently at the first one).
pub(crate) fn cache_invalidation(
    inv: &CacheInvalidate,
    did: DomainId,
    devices: &[SourceId],
    cap: &Cap,
) -> Result<Vec<InvDesc>, DriverError> {
    if inv.cache >> IOMMU_CACHE_INV_TYPE_NR != 0 {
        return Err(DriverError::invalid(
            "cache invalidation",
            format!("unknown cache types {:#x}", inv.cache),
        ));
    }
    let plans = (0..IOMMU_CACHE_INV_TYPE_NR)
        .map(|b| 1u8 << b)
        .filter(|t| inv.cache & t != 0)
        .map(|t| plan(t, &inv.granularity))
        .collect::<Result<Vec<_>, _>>()?;
    let pasid = inv.pasid().unwrap_or(Pasid::new(0).expect("PASID 0"));
    let mut descs = Vec::new();
    for p in plans {
        match p {
            Planned::PasidIotlb => {
                descs.push(piotlb_pasid(did, pasid));
                for &sid in devices {
                    descs.push(dev_iotlb(sid, Some(pasid), 0, WHOLE_SPACE));
                }
            }
            Planned::PasidIotlbPages(pg) => {
                descs.push(piotlb_pages(did, pasid, pg.addr, pg.order, pg.leaf, cap));
                for &sid in devices {
                    descs.push(dev_iotlb(sid, Some(pasid), pg.addr, pg.order));
                }
            }
            Planned::DevIotlbPages(pg) => {
                for &sid in devices {
                    descs.push(dev_iotlb(sid, Some(pasid), pg.addr, pg.order));
                }
            }
        }
    }
    Ok(descs)
}
