//! The encodings of an invalidation's size (VT-d §6.5.2.3-§6.5.2.6): the address mask (AM)
//! of IOTLB and PASID-based IOTLB descriptors, a naturally aligned block of `2^AM` pages,
//! and the PCIe ATS size encoding of device-TLB descriptors (S set, the lowest clear
//! address bit at and above bit 12 giving the size).

/// log2 of the 4-KiB pages invalidations count in.
pub const PAGE_SHIFT: u32 = 12;

/// The ATS size order of an invalidation of the whole address space: `4 KiB << 52` is
/// 2^64 bytes.
pub const WHOLE_SPACE: u8 = 52;

/// The smallest order `n` such that the naturally aligned block of `2^n` pages holding
/// `start` also holds `last` (`start <= last`).
pub fn covering_order(start: u64, last: u64) -> u8 {
    let differ = (start >> PAGE_SHIFT) ^ (last >> PAGE_SHIFT);
    (u64::BITS - differ.leading_zeros()) as u8
}

/// The smallest naturally aligned block of pages holding `[start, last]`: its address and
/// order (as `intel_flush_svm_range_dev` and `iommu_flush_iotlb_psi` compute the mask).
pub fn covering_block(start: u64, last: u64) -> (u64, u8) {
    let order = covering_order(start, last);
    (block_base(start, order), order)
}

/// The first address of the naturally aligned block of `2^order` pages holding `addr`.
pub fn block_base(addr: u64, order: u8) -> u64 {
    match 1u64.checked_shl(PAGE_SHIFT + u32::from(order)) {
        Some(size) => addr & !(size - 1),
        None => 0,
    }
}

/// The fewest naturally aligned blocks of pages that together are exactly the pages of
/// `[start, last]` (`start <= last`), lowest first, as `(address, order)`: what one
/// page-selective invalidation each (§6.5.2.4, address mask AM) removes. A range is at
/// most 2 × 52 blocks.
pub fn aligned_blocks(start: u64, last: u64) -> impl Iterator<Item = (u64, u8)> {
    let mut next = Some(start >> PAGE_SHIFT);
    let end = last >> PAGE_SHIFT;
    std::iter::from_fn(move || {
        let page = next.filter(|&p| p <= end)?;
        // The largest block aligned at `page` that ends at or before `end`.
        let room = end - page;
        let by_room = u64::BITS - 1 - (room + 1).leading_zeros();
        let order = page.trailing_zeros().min(by_room);
        next = Some(page + (1u64 << order));
        Some((page << PAGE_SHIFT, order as u8))
    })
}

/// The order of `bytes` rounded up to whole 4-KiB pages and to a power of two of them,
/// as `order_base_2` of the page count in intel-iommu.
pub fn size_order(bytes: u64) -> u8 {
    let pages = bytes.div_ceil(1 << PAGE_SHIFT).max(1);
    pages.next_power_of_two().trailing_zeros() as u8
}

/// The address field of a device-TLB invalidation of the naturally aligned block of
/// `2^order` pages holding `addr`, with its size bit S (§6.5.2.5, §6.5.2.6, PCIe ATS): the
/// bits below the block's top bit are set and that bit is clear; order 0 is one page with
/// S clear; [`WHOLE_SPACE`] and above is every address.
pub fn ats_address(addr: u64, order: u8) -> (u64, bool) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use vsva_vtd::inv_desc::AddrRange;

    #[test]
    fn ats_encoding_matches_the_spec_examples() {
        // One page: S clear. 8 KiB: bit 12 clear, S set. 16 KiB: bits 13:12 = 01b.
        assert_eq!(ats_address(0x5000, 0), (0x5000, false));
        assert_eq!(ats_address(0x6000, 1), (0x6000, true));
        assert_eq!(ats_address(0x8000, 2), (0x9000, true));
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
    fn blocks_cover_ranges() {
        assert_eq!(covering_block(0x5000, 0x5fff), (0x5000, 0));
        assert_eq!(covering_block(0x5000, 0x6fff), (0x4000, 2));
        assert_eq!(covering_block(0x4000, 0x5fff), (0x4000, 1));
        assert_eq!(covering_block(0, (1 << 47) - 1), (0, 35));
        assert_eq!(covering_block(0, u64::MAX), (0, 52));
    }

    #[test]
    fn aligned_blocks_split_at_alignment() {
        let b = |s, l| aligned_blocks(s, l).collect::<Vec<_>>();
        assert_eq!(b(0x4000_0000, 0x4003_ffff), vec![(0x4000_0000, 6)]);
        assert_eq!(b(0x1000, 0x3fff), vec![(0x1000, 0), (0x2000, 1)]);
        assert_eq!(
            b(0x1000, 0x4fff),
            vec![(0x1000, 0), (0x2000, 1), (0x4000, 0)]
        );
        assert_eq!(b(0x5123, 0x5456), vec![(0x5000, 0)]);
        assert_eq!(b(0, u64::MAX), vec![(0, 52)]);
    }

    #[test]
    fn size_orders_round_up() {
        assert_eq!(size_order(0x1000), 0);
        assert_eq!(size_order(0x2000), 1);
        assert_eq!(size_order(0x3000), 2);
        assert_eq!(size_order(2 << 20), 9);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// The covering order is the straightforward search: the first order whose block
        /// numbers of both ends agree.
        #[test]
        fn covering_order_is_the_first_common_block(start in any::<u64>(), len in any::<u64>()) {
            let last = start.saturating_add(len);
            let naive = (0u32..=52)
                .find(|n| start.checked_shr(12 + n).unwrap_or(0) == last.checked_shr(12 + n).unwrap_or(0))
                .unwrap();
            prop_assert_eq!(u32::from(covering_order(start, last)), naive);
            let (base, order) = covering_block(start, last);
            let r = AddrRange::from_address_mask(base, order);
            prop_assert!(r.contains(start) && r.contains(last));
        }

        /// The ATS field is the straightforward formula: the block's address with bits
        /// `11 + order .. 12` set, and it decodes (as the device does) to that block.
        #[test]
        fn ats_address_is_the_formula(addr in any::<u64>(), order in 0u8..=WHOLE_SPACE) {
            let (a, s) = ats_address(addr, order);
            prop_assert_eq!(s, order > 0);
            let r = AddrRange::from_ats_size(a, s);
            if order >= WHOLE_SPACE {
                prop_assert_eq!(r, AddrRange { start: 0, last: u64::MAX });
            } else {
                let size = 1u64 << (12 + u32::from(order));
                let mut formula = addr & !(size - 1);
                for bit in 12..11 + u32::from(order) {
                    formula |= 1 << bit;
                }
                prop_assert_eq!(a, formula);
                prop_assert_eq!(r.start, addr & !(size - 1));
                prop_assert_eq!(r.last - r.start, size - 1);
            }
        }

        /// The aligned blocks of a range are aligned, follow one another with no gap or
        /// overlap from its first page to its last, and are no more than 2 × 52.
        #[test]
        fn aligned_blocks_are_exactly_the_range(start in any::<u64>(), len in any::<u64>()) {
            let last = start.saturating_add(len);
            let blocks: Vec<_> = aligned_blocks(start, last).collect();
            prop_assert!(!blocks.is_empty() && blocks.len() <= 104);
            let mut expect = start & !0xfff;
            for &(base, order) in &blocks {
                prop_assert_eq!(base, expect);
                prop_assert_eq!(block_base(base, order), base);
                let size = 1u64 << (12 + u32::from(order));
                expect = base.wrapping_add(size);
            }
            prop_assert_eq!(expect.wrapping_sub(1), last | 0xfff);
            // Fewest: no two neighbours could be one block.
            for w in blocks.windows(2) {
                let ((a, oa), (_, ob)) = (w[0], w[1]);
                prop_assert!(!(oa == ob && block_base(a, oa + 1) == a));
            }
        }

        /// The size order is the smallest power of two of pages holding the bytes.
        #[test]
        fn size_order_is_the_smallest_power(bytes in 1u64..(1 << 50)) {
            let order = u32::from(size_order(bytes));
            prop_assert!(4096u64 << order >= bytes);
            prop_assert!(order == 0 || 4096u64 << (order - 1) < bytes);
        }
    }
}
