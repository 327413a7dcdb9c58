//! Invalidation descriptors the driver issues (VT-d §6.5.2), built for address ranges as
//! intel-iommu builds them: one descriptor per range, its size given by the address mask
//! (AM) or the ATS size bit, never one descriptor per page. Descriptors with no range
//! (context cache, PASID cache, global flushes) are `vsva_vtd::inv_desc::InvDesc` values as they are.

use vsva_vtd::inv_desc::{IotlbGranularity, PasidIotlbGranularity};
use vsva_vtd::regs::{Cap, Ecap};
use vsva_vtd::{addr::DomainId, addr::Pasid, addr::SourceId, inv_desc::InvDesc};

use crate::mask::{ats_address, block_base, covering_order};

/// IOTLB invalidation of a domain's second-level translations of `[start, last]`
/// (§6.5.2.3): page-selective within the domain with the covering address mask, or
/// domain-selective when the unit lacks page-selective invalidation (CAP.PSI) or the mask
/// exceeds CAP.MAMV, as `iommu_flush_iotlb_psi` falls back.
pub fn iotlb_range(did: DomainId, start: u64, last: u64, cap: &Cap) -> InvDesc {
    let am = covering_order(start, last);
    if cap.psi && am <= cap.mamv {
        InvDesc::Iotlb {
            granularity: IotlbGranularity::PageSelective,
            dr: cap.drd,
            dw: cap.dwd,
            did,
            addr: block_base(start, am),
            ih: false,
            am,
        }
    } else {
        iotlb_domain(did, cap)
    }
}

/// Domain-selective IOTLB invalidation (§6.5.2.3).
pub fn iotlb_domain(did: DomainId, cap: &Cap) -> InvDesc {
    InvDesc::Iotlb {
        granularity: IotlbGranularity::DomainSelective,
        dr: cap.drd,
        dw: cap.dwd,
        did,
        addr: 0,
        ih: false,
        am: 0,
    }
}

/// PASID-selective PASID-based IOTLB invalidation (§6.5.2.4): every first-level and
/// nested translation of `pasid` in the domain (`qi_flush_piotlb` with `npages = -1`).
pub const fn piotlb_pasid(did: DomainId, pasid: Pasid) -> InvDesc {
    InvDesc::PasidIotlb {
        granularity: PasidIotlbGranularity::PasidSelective,
        did,
        pasid,
        addr: 0,
        ih: false,
        am: 0,
    }
}

/// Page-selective-within-PASID PASID-based IOTLB invalidation of the naturally aligned
/// `2^am` pages at `addr`; PASID-selective when `am` exceeds CAP.MAMV.
pub fn piotlb_pages(
    did: DomainId,
    pasid: Pasid,
    addr: u64,
    am: u8,
    leaf: bool,
    cap: &Cap,
) -> InvDesc {
    if am > cap.mamv {
        return piotlb_pasid(did, pasid);
    }
    InvDesc::PasidIotlb {
        granularity: PasidIotlbGranularity::PageSelectiveWithinPasid,
        did,
        pasid,
        addr: block_base(addr, am),
        ih: leaf,
        am,
    }
}

/// Device-TLB invalidation of `2^order` pages at `addr` for the requests of `sid` without
/// PASID (§6.5.2.5, `qi_flush_dev_iotlb`) or with `pasid` (PASID-based, §6.5.2.6,
/// `qi_flush_dev_iotlb_pasid`) on a unit with extended capabilities `ecap`: PFSID as
/// [`pfsid`] gives it (0 without ECAP.DIT).
pub fn dev_iotlb(
    sid: SourceId,
    ecap: &Ecap,
    pasid: Option<Pasid>,
    addr: u64,
    order: u8,
) -> InvDesc {
    dev_iotlb_pf(sid, pfsid(sid, ecap), pasid, addr, order)
}

/// The PFSID field of a device-TLB invalidation for device `sid` (§6.5.2.5): the physical
/// function's source id when ECAP.DIT is set, else 0 (reserved), as
/// `iommu_enable_dev_iotlb` sets `info->pfsid`. The devices modelled are physical
/// functions, so their PF is themselves.
pub fn pfsid(sid: SourceId, ecap: &Ecap) -> SourceId {
    if ecap.dit {
        sid
    } else {
        SourceId::from_rid(0)
    }
}

/// [`dev_iotlb`] with the PFSID field given.
pub fn dev_iotlb_pf(
    sid: SourceId,
    pfsid: SourceId,
    pasid: Option<Pasid>,
    addr: u64,
    order: u8,
) -> InvDesc {
    let (addr, size) = ats_address(addr, order);
    match pasid {
        None => InvDesc::DevIotlb {
            sid,
            pfsid,
            max_invs_pend: 0,
            addr,
            size,
        },
        Some(pasid) => InvDesc::PasidDevIotlb {
            sid,
            pfsid,
            pasid,
            max_invs_pend: 0,
            addr,
            size,
            global: false,
        },
    }
}

/// Queue depths from this value up go into a device-TLB invalidation descriptor as MIP 0
/// (Linux `QI_DEV_IOTLB_MAX_INVS`): the 5-bit field (§6.5.2.5) cannot hold 32.
pub const MAX_INVS_PEND: u8 = 32;

/// The device-TLB invalidation `desc` (from [`dev_iotlb`] or [`dev_iotlb_pf`]) for a
/// device whose ATS Invalidate Queue Depth is `qdep` (1 to 32, Linux `info->ats_qdep`):
/// MIP is the depth, 0 from 32 up, as `qi_flush_dev_iotlb` sets it. Other descriptors are
/// returned as they are.
pub fn with_queue_depth(desc: InvDesc, qdep: u8) -> InvDesc {
    let mip = if qdep >= MAX_INVS_PEND { 0 } else { qdep };
    match desc {
        InvDesc::DevIotlb {
            sid,
            pfsid,
            addr,
            size,
            ..
        } => InvDesc::DevIotlb {
            sid,
            pfsid,
            max_invs_pend: mip,
            addr,
            size,
        },
        InvDesc::PasidDevIotlb {
            sid,
            pfsid,
            pasid,
            addr,
            size,
            global,
            ..
        } => InvDesc::PasidDevIotlb {
            sid,
            pfsid,
            pasid,
            max_invs_pend: mip,
            addr,
            size,
            global,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::WHOLE_SPACE;
    use proptest::prelude::*;
    use vsva_vtd::inv_desc::AddrRange;

    #[test]
    fn the_queue_depth_is_the_mip_below_32() {
        let sid = SourceId::from_rid(0x10);
        let ecap = Ecap::default();
        let p = Pasid::new(5).unwrap();
        for (qdep, mip) in [(1, 1), (5, 5), (31, 31), (32, 0)] {
            for pasid in [None, Some(p)] {
                match with_queue_depth(dev_iotlb(sid, &ecap, pasid, 0, WHOLE_SPACE), qdep) {
                    InvDesc::DevIotlb { max_invs_pend, .. }
                    | InvDesc::PasidDevIotlb { max_invs_pend, .. } => {
                        assert_eq!(max_invs_pend, mip, "{qdep} {pasid:?}")
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
        let other = piotlb_pasid(DomainId(1), p);
        assert_eq!(with_queue_depth(other, 5), other);
    }

    fn cap(mamv: u8) -> Cap {
        Cap {
            psi: true,
            mamv,
            ..Cap::default()
        }
    }

    #[test]
    fn large_masks_fall_back_to_wider_granularities() {
        let did = DomainId(5);
        let c = cap(9);
        assert!(matches!(
            iotlb_range(did, 0, (1 << 30) - 1, &c),
            InvDesc::Iotlb {
                granularity: IotlbGranularity::DomainSelective,
                ..
            }
        ));
        let no_psi = Cap { psi: false, ..c };
        assert!(matches!(
            iotlb_range(did, 0, 0xfff, &no_psi),
            InvDesc::Iotlb {
                granularity: IotlbGranularity::DomainSelective,
                ..
            }
        ));
        let p = Pasid::new(3).unwrap();
        assert_eq!(piotlb_pages(did, p, 0, 10, false, &c), piotlb_pasid(did, p));
    }

    #[test]
    fn device_tlb_descriptors_cover_their_block() {
        let sid = SourceId::from_rid(0x10);
        let p = Pasid::new(4).unwrap();
        let d = dev_iotlb(sid, &Ecap::default(), Some(p), 0x7000, 2);
        assert_eq!(
            d.range(),
            Some(AddrRange {
                start: 0x4000,
                last: 0x7fff
            })
        );
        assert!(matches!(
            dev_iotlb(sid, &Ecap::default(), None, 0, WHOLE_SPACE),
            InvDesc::DevIotlb { size: true, .. }
        ));
    }

    #[test]
    fn pfsid_is_zero_without_dit() {
        let sid = SourceId::from_rid(0x10);
        let without = Ecap::default();
        let with = Ecap {
            dit: true,
            ..Ecap::default()
        };
        assert_eq!(pfsid(sid, &without), SourceId::from_rid(0));
        assert_eq!(pfsid(sid, &with), sid);
        let p = Pasid::new(4).unwrap();
        for (pasid, ecap) in [(None, &without), (Some(p), &with)] {
            match dev_iotlb_pf(sid, pfsid(sid, ecap), pasid, 0, WHOLE_SPACE) {
                InvDesc::DevIotlb { pfsid: f, .. } | InvDesc::PasidDevIotlb { pfsid: f, .. } => {
                    assert_eq!(f, pfsid(sid, ecap))
                }
                other => panic!("{other:?}"),
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// A page-selective IOTLB descriptor covers the whole range, with the smallest
        /// aligned block that does.
        #[test]
        fn iotlb_range_covers_the_range(start in 0u64..(1 << 40), len in 1u64..(1 << 32)) {
            let last = start + len - 1;
            let d = iotlb_range(DomainId(9), start, last, &cap(63));
            let r = d.range().unwrap();
            prop_assert!(r.start <= start && last <= r.last);
            // One order less would not cover both ends.
            let am = covering_order(start, last);
            if am > 0 {
                let half = AddrRange::from_address_mask(start, am - 1);
                prop_assert!(!half.contains(last));
            }
        }
    }
}
