//! Invalidation descriptors the driver issues (VT-d §6.5.2), built for address ranges as
//! intel-iommu builds them: one descriptor per range, its size given by the address mask
//! (AM) or the ATS size bit, never one descriptor per page.

use vsva_vtd::inv_desc::{IotlbGranularity, PasidIotlbGranularity};
use vsva_vtd::regs::Cap;
use vsva_vtd::{DomainId, InvDesc, Pasid, SourceId};

/// log2 of the 4-KiB page invalidations count in.
const PAGE_SHIFT: u32 = 12;

/// The ATS size order of an invalidation of the whole address space: `4 KiB << 52` is
/// 2^64 bytes.
pub(crate) const WHOLE_SPACE: u8 = 52;

/// The smallest order `n` such that the naturally aligned block of `2^n` pages holding
/// `start` also holds `last` (`start <= last`).
pub(crate) fn covering_order(start: u64, last: u64) -> u8 {
    let differ = (start >> PAGE_SHIFT) ^ (last >> PAGE_SHIFT);
    (u64::BITS - differ.leading_zeros()) as u8
}

/// The order of `bytes` rounded up to whole 4-KiB pages and to a power of two of them,
/// as `order_base_2` of the page count in intel-iommu.
pub(crate) fn size_order(bytes: u64) -> u8 {
    let pages = bytes.div_ceil(1 << PAGE_SHIFT).max(1);
    pages.next_power_of_two().trailing_zeros() as u8
}

/// IOTLB invalidation of a domain's second-level translations of `[start, last]`
/// (§6.5.2.3): page-selective within the domain with the covering address mask, or
/// domain-selective when the unit lacks page-selective invalidation (CAP.PSI) or the mask
/// exceeds CAP.MAMV, as `iommu_flush_iotlb_psi` falls back.
pub(crate) fn iotlb_range(did: DomainId, start: u64, last: u64, cap: &Cap) -> InvDesc {
    let am = covering_order(start, last);
    if cap.psi && am <= cap.mamv {
        let addr = start & !((1u64 << (PAGE_SHIFT + u32::from(am))) - 1);
        InvDesc::Iotlb {
            granularity: IotlbGranularity::PageSelective,
            dr: cap.drd,
            dw: cap.dwd,
            did,
            addr,
            ih: false,
            am,
        }
    } else {
        iotlb_domain(did, cap)
    }
}

/// Domain-selective IOTLB invalidation (§6.5.2.3).
pub(crate) fn iotlb_domain(did: DomainId, cap: &Cap) -> InvDesc {
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
/// nested translation of `pasid` in the domain.
pub(crate) fn piotlb_pasid(did: DomainId, pasid: Pasid) -> InvDesc {
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
pub(crate) fn piotlb_pages(
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
        addr: addr & !((1u64 << (PAGE_SHIFT + u32::from(am))) - 1),
        ih: leaf,
        am,
    }
}

/// The address field of a device-TLB invalidation of the naturally aligned block of
/// `2^order` pages holding `addr`, with its size bit (§6.5.2.5, PCIe ATS): the bits below
/// the block's top bit are set and that bit is clear; order 0 is one page with S clear.
pub(crate) fn ats_address(addr: u64, order: u8) -> (u64, bool) {
    if order == 0 {
        return (addr & !0xfff, false);
    }
    if order >= WHOLE_SPACE {
        return (((1u64 << 63) - 1) & !0xfff, true);
    }
    let block = 1u64 << (PAGE_SHIFT + u32::from(order));
    let low = (block >> 1) - 1;
    ((addr & !(block - 1)) | (low & !0xfff), true)
}

/// Device-TLB invalidation of `2^order` pages at `addr` for the requests of `sid` without
/// PASID (§6.5.2.5) or with `pasid` (PASID-based, §6.5.2.6).
pub(crate) fn dev_iotlb(sid: SourceId, pasid: Option<Pasid>, addr: u64, order: u8) -> InvDesc {
    let (addr, size) = ats_address(addr, order);
    match pasid {
        None => InvDesc::DevIotlb {
            sid,
            pfsid: sid,
            max_invs_pend: 0,
            addr,
            size,
        },
        Some(pasid) => InvDesc::PasidDevIotlb {
            sid,
            pfsid: sid,
            pasid,
            max_invs_pend: 0,
            addr,
            size,
            global: false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use vsva_vtd::AddrRange;

    fn cap(mamv: u8) -> Cap {
        Cap {
            psi: true,
            mamv,
            ..Cap::default()
        }
    }

    #[test]
    fn ats_encoding_matches_the_spec_examples() {
        // One page: S clear. 8 KiB: bit 12 clear, S set. 16 KiB: bits 13:12 = 01b.
        assert_eq!(ats_address(0x5000, 0), (0x5000, false));
        assert_eq!(ats_address(0x6000, 1), (0x6000, true));
        assert_eq!(ats_address(0x8000, 2), (0x9000, true));
        assert_eq!(
            AddrRange::from_ats_size(0x9000, true),
            AddrRange {
                start: 0x8000,
                last: 0xbfff
            }
        );
        let (all, s) = ats_address(0x1234_5000, WHOLE_SPACE);
        assert_eq!(
            AddrRange::from_ats_size(all, s),
            AddrRange {
                start: 0,
                last: u64::MAX
            }
        );
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
    fn size_orders_round_up() {
        assert_eq!(size_order(0x1000), 0);
        assert_eq!(size_order(0x2000), 1);
        assert_eq!(size_order(0x3000), 2);
        assert_eq!(size_order(2 << 20), 9);
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

        /// The ATS encoding decodes (as the device does) to the aligned block asked for.
        #[test]
        fn ats_address_round_trips(addr in any::<u64>(), order in 0u8..=WHOLE_SPACE) {
            let (a, s) = ats_address(addr, order);
            let r = AddrRange::from_ats_size(a, s);
            if order >= WHOLE_SPACE {
                prop_assert_eq!(r, AddrRange { start: 0, last: u64::MAX });
            } else {
                let size = 1u64 << (12 + u32::from(order));
                prop_assert_eq!(r.start, addr & !(size - 1));
                prop_assert_eq!(r.last - r.start, size - 1);
            }
        }
    }
}
