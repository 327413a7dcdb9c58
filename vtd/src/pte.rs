//! What first-level (§9.7) and second-level (§9.8) paging entries share: the address field
//! (bits 51:12) and the page-size bit (PS, bit 7) that makes an entry at level 2 or 3 map a
//! 2-MiB or 1-GiB page.

use crate::field::bits;
use crate::walk::PageSize;

/// The address field, bits 51:12.
pub(crate) const ADDR_MASK: u64 = bits(51, 12);
/// Page size (levels 2 and 3): the entry maps a page.
pub(crate) const PS: u64 = 1 << 7;

/// An entry pointing to the table at `table` (4-KiB aligned), with `flags` in the bits
/// outside the address field.
pub(crate) const fn table(table: u64, flags: u64) -> u64 {
    (table & ADDR_MASK) | (flags & !ADDR_MASK)
}

/// A leaf mapping the page of `size` at `page`: the page's address bits, `flags` in every
/// other bit, and PS for a large page.
pub(crate) const fn page(page: u64, size: PageSize, flags: u64) -> u64 {
    let ps = match size {
        PageSize::Size4K => 0,
        PageSize::Size2M | PageSize::Size1G => PS,
    };
    let addr_mask = ADDR_MASK & !(size.bytes() - 1);
    (page & addr_mask) | (flags & !addr_mask) | ps
}

/// Whether the entry `raw` at `level` maps a page (level 1, or PS set at level 2 or 3)
/// rather than pointing to a table.
pub(crate) const fn is_leaf(raw: u64, level: u8) -> bool {
    level == 1 || ((level == 2 || level == 3) && raw & PS != 0)
}

/// The base address of the page of `size` that the leaf `raw` maps.
pub(crate) const fn page_address(raw: u64, size: PageSize) -> u64 {
    raw & ADDR_MASK & !(size.bytes() - 1)
}

/// Reserved-bit masks of a paging mode, two per level 0..=5 (PS clear, PS set), as the
/// first- and second-level formats compute them when made.
pub(crate) type ReservedMasks = [u64; 12];

/// The mask of the bits reserved at `level` in the entry `raw` (which of the level's two
/// masks depends on PS): one table read; every bit at a level outside the table.
#[inline(always)]
pub(crate) const fn reserved_mask(masks: &ReservedMasks, level: u8, raw: u64) -> u64 {
    let i = (level as usize) << 1 | (raw & PS != 0) as usize;
    if i < masks.len() {
        masks[i]
    } else {
        u64::MAX
    }
}
