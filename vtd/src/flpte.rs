//! First-level paging entries (VT-d §9.7): the IA-32e format of the CPU's 4- and 5-level
//! paging (Intel SDM vol. 3 §4.5), so a process's own page tables can be walked by the IOMMU.
//!
//! Levels are numbered as the walkers number them: 5 = PML5E, 4 = PML4E, 3 = PDPE,
//! 2 = PDE, 1 = PTE.

use crate::field::bits;
use crate::pte;
use crate::walk::PageSize;

/// The first-level paging mode, the PASID entry's FLPM field (§9.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlPagingMode {
    /// 4-level paging, 48-bit input addresses (FLPM = 00b).
    FourLevel,
    /// 5-level paging, 57-bit input addresses (FLPM = 01b).
    FiveLevel,
}

impl FlPagingMode {
    /// The mode an FLPM field value selects; other values are reserved.
    pub const fn from_flpm(flpm: u8) -> Option<Self> {
        match flpm {
            0 => Some(FlPagingMode::FourLevel),
            1 => Some(FlPagingMode::FiveLevel),
            _ => None,
        }
    }

    /// The FLPM field value of the mode.
    pub const fn flpm(self) -> u8 {
        match self {
            FlPagingMode::FourLevel => 0,
            FlPagingMode::FiveLevel => 1,
        }
    }

    /// The number of table levels walked.
    pub const fn levels(self) -> u8 {
        match self {
            FlPagingMode::FourLevel => 4,
            FlPagingMode::FiveLevel => 5,
        }
    }

    /// The number of significant input-address bits.
    pub const fn input_width(self) -> u32 {
        12 + 9 * self.levels() as u32
    }

    /// Whether `addr` is canonical: bits 63 down to the top input bit are all equal
    /// (a non-canonical input is fault SGN.1).
    pub const fn is_canonical(self, addr: u64) -> bool {
        let shift = 64 - self.input_width();
        (((addr << shift) as i64) >> shift) as u64 == addr
    }
}

/// An address width that a paging-entry format cannot have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("address width {0} is outside 32..=52 bits")]
pub struct InvalidAddressWidth(pub u8);

/// Checks an address width for an entry format's address field.
pub(crate) const fn check_address_width(width: u8) -> Result<u8, InvalidAddressWidth> {
    if width >= 32 && width <= 52 {
        Ok(width)
    } else {
        Err(InvalidAddressWidth(width))
    }
}

/// A first-level paging entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlPte(pub u64);

impl FlPte {
    /// Present.
    pub const P: u64 = 1 << 0;
    /// Read/write: writes allowed through this entry.
    pub const RW: u64 = 1 << 1;
    /// User/supervisor: user-privilege requests allowed through this entry.
    pub const US: u64 = 1 << 2;
    /// Page-level write-through.
    pub const PWT: u64 = 1 << 3;
    /// Page-level cache disable.
    pub const PCD: u64 = 1 << 4;
    /// Accessed: set by hardware when the entry is used.
    pub const A: u64 = 1 << 5;
    /// Dirty (leaf entries): set by hardware on a write through the entry.
    pub const D: u64 = 1 << 6;
    /// Page size (PDPE, PDE): the entry maps a 1-GiB or 2-MiB page.
    pub const PS: u64 = pte::PS;
    /// Page attribute table bit of a 4-KiB page entry (PTE; same position as PS).
    pub const PAT_4K: u64 = 1 << 7;
    /// Global (leaf entries).
    pub const G: u64 = 1 << 8;
    /// Extended-accessed: set by the IOMMU, next to A, when the PASID entry's EAFE is 1
    /// (§3.6.3), so software can tell device accesses from CPU accesses.
    pub const EA: u64 = 1 << 10;
    /// Page attribute table bit of a 1-GiB or 2-MiB page entry.
    pub const PAT_LARGE: u64 = 1 << 12;
    /// Execute-disable.
    pub const XD: u64 = 1 << 63;
    /// The address field, bits 51:12.
    pub const ADDR_MASK: u64 = pte::ADDR_MASK;

    /// An entry pointing to the next table at `table` (4-KiB aligned); `flags` are entry
    /// bits such as [`FlPte::RW`] and [`FlPte::US`]. P is always set.
    pub const fn table(table: u64, flags: u64) -> Self {
        FlPte(pte::table(table, flags) | Self::P)
    }

    /// A leaf entry mapping the page of `size` at `page`; sets P, and PS for large pages.
    /// `flags` may use every bit but the page's address bits (so PAT bit 12 of a large page).
    pub const fn page(page: u64, size: PageSize, flags: u64) -> Self {
        FlPte(pte::page(page, size, flags) | Self::P)
    }

    /// P.
    pub const fn present(self) -> bool {
        self.0 & Self::P != 0
    }

    /// R/W.
    pub const fn writable(self) -> bool {
        self.0 & Self::RW != 0
    }

    /// U/S.
    pub const fn user(self) -> bool {
        self.0 & Self::US != 0
    }

    /// A.
    pub const fn accessed(self) -> bool {
        self.0 & Self::A != 0
    }

    /// D.
    pub const fn dirty(self) -> bool {
        self.0 & Self::D != 0
    }

    /// XD.
    pub const fn execute_disable(self) -> bool {
        self.0 & Self::XD != 0
    }

    /// Whether the entry at `level` maps a page (a PTE, or a PDPE/PDE with PS set) rather
    /// than pointing to a table.
    pub const fn is_leaf(self, level: u8) -> bool {
        pte::is_leaf(self.0, level)
    }

    /// The next table's address (bits 51:12).
    pub const fn table_address(self) -> u64 {
        self.0 & Self::ADDR_MASK
    }

    /// The mapped page's base address for a leaf of `size` (bits 51:30 for 1 GiB, 51:21 for
    /// 2 MiB, 51:12 for 4 KiB).
    pub const fn page_address(self, size: PageSize) -> u64 {
        pte::page_address(self.0, size)
    }
}

/// The reserved-bit layout of first-level entries for one IOMMU configuration.
///
/// The reserved bits of every level, with PS clear and set, are computed when the format
/// is made, so that a walker checks an entry with one mask compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlFormat {
    address_width: u8,
    one_gib_pages: bool,
    /// The reserved-bit mask of level `i / 2` with PS equal to `i % 2`; level 0 (no such
    /// level) reserves every bit.
    masks: pte::ReservedMasks,
}

impl FlFormat {
    /// The format for addresses of `address_width` bits (bits 51 down to the width are
    /// reserved; the host address width, HAW) and, if `one_gib_pages` (CAP_REG.FL1GP), with
    /// 1-GiB pages; without it a PDPE with PS set is a reserved-bit fault.
    pub const fn new(address_width: u8, one_gib_pages: bool) -> Result<Self, InvalidAddressWidth> {
        match check_address_width(address_width) {
            Ok(address_width) => Ok(FlFormat {
                address_width,
                one_gib_pages,
                masks: Self::masks(address_width, one_gib_pages),
            }),
            Err(e) => Err(e),
        }
    }

    /// The mask table of a format (§9.7's reserved bits): the address bits above the width
    /// at every level; the address bits below a large page's size but above its PAT bit
    /// (bit 12); PS where no page can be mapped (levels 4 and 5, and a PDPE without 1-GiB
    /// pages). In a PTE bit 7 is PAT, never reserved.
    const fn masks(address_width: u8, one_gib_pages: bool) -> [u64; 12] {
        let above_width = bits(51, address_width as u32);
        let one_gib = if one_gib_pages {
            above_width | bits(29, 13)
        } else {
            above_width | FlPte::PS
        };
        [
            u64::MAX,
            u64::MAX,
            above_width,
            above_width,
            above_width,
            above_width | bits(20, 13),
            above_width,
            one_gib,
            above_width | FlPte::PS,
            above_width | FlPte::PS,
            above_width | FlPte::PS,
            above_width | FlPte::PS,
        ]
    }

    /// The address width.
    pub const fn address_width(&self) -> u8 {
        self.address_width
    }

    /// Whether 1-GiB pages are supported.
    pub const fn one_gib_pages(&self) -> bool {
        self.one_gib_pages
    }

    /// The bits of `pte` that are reserved at `level` and set: non-zero means fault SFL.3.
    /// At a level outside 1..=5 every bit is reserved.
    #[inline(always)]
    pub const fn reserved_bits(&self, level: u8, pte: FlPte) -> u64 {
        pte.0 & self.reserved(level, pte.0)
    }

    /// The mask of the bits reserved at `level` in the entry `raw` (which of its two masks
    /// depends on PS): one table read.
    #[inline(always)]
    pub(crate) const fn reserved(&self, level: u8, raw: u64) -> u64 {
        pte::reserved_mask(&self.masks, level, raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_entry_matches_hand_encoding() {
        // P | RW | US at table 0x1234_5000.
        let pte = FlPte::table(0x1234_5000, FlPte::RW | FlPte::US);
        assert_eq!(pte.0, 0x0000_0000_1234_5007);
        assert!(pte.present() && pte.writable() && pte.user());
        assert!(!pte.is_leaf(4) && !pte.is_leaf(3) && !pte.is_leaf(2));
        assert_eq!(pte.table_address(), 0x1234_5000);
    }

    #[test]
    fn page_entries_match_hand_encoding() {
        // 4 KiB: P | RW | A | D | XD, address 0xa_bcde_f000.
        let pte = FlPte::page(
            0xa_bcde_f000,
            PageSize::Size4K,
            FlPte::RW | FlPte::A | FlPte::D | FlPte::XD,
        );
        assert_eq!(pte.0, 0x8000_000a_bcde_f063);
        assert!(pte.is_leaf(1) && pte.accessed() && pte.dirty() && pte.execute_disable());
        assert_eq!(pte.page_address(PageSize::Size4K), 0xa_bcde_f000);

        // 2 MiB: P | US | PS | G, address 0x4060_0000.
        let pte = FlPte::page(0x4060_0000, PageSize::Size2M, FlPte::US | FlPte::G);
        assert_eq!(pte.0, 0x0000_0000_4060_0185);
        assert!(pte.is_leaf(2));
        assert_eq!(pte.page_address(PageSize::Size2M), 0x4060_0000);

        // 1 GiB: P | RW | PS | PAT (bit 12), address 0x3_c000_0000.
        let pte = FlPte::page(
            0x3_c000_0000,
            PageSize::Size1G,
            FlPte::RW | FlPte::PAT_LARGE,
        );
        assert_eq!(pte.0, 0x0000_0003_c000_1083);
        assert!(pte.is_leaf(3));
        // The PAT bit is not part of the page address.
        assert_eq!(pte.page_address(PageSize::Size1G), 0x3_c000_0000);
    }

    #[test]
    fn page_address_drops_offset_bits() {
        let pte = FlPte::page(0x4060_1234, PageSize::Size2M, 0);
        assert_eq!(pte.0, 0x4060_0081);
    }

    #[test]
    fn reserved_bits_per_level() {
        let f = FlFormat::new(46, true).unwrap();
        // Bit 46 is above a 46-bit width at every level.
        for level in 1..=5 {
            assert_eq!(f.reserved_bits(level, FlPte(FlPte::P | 1 << 46)), 1 << 46);
            // Bits 62:52 and XD are never reserved.
            assert_eq!(
                f.reserved_bits(level, FlPte(FlPte::P | FlPte::XD | bits(62, 52))),
                0
            );
        }
        // PS is reserved in PML4E and PML5E.
        assert_eq!(f.reserved_bits(4, FlPte(FlPte::P | FlPte::PS)), FlPte::PS);
        assert_eq!(f.reserved_bits(5, FlPte(FlPte::P | FlPte::PS)), FlPte::PS);
        // A 2-MiB page reserves bits 20:13 (bit 12 is PAT).
        let pde = FlPte(0x0020_0000 | 1 << 13 | FlPte::PAT_LARGE | FlPte::PS | FlPte::P);
        assert_eq!(f.reserved_bits(2, pde), 1 << 13);
        // The same bits in a PDE pointing to a table are address bits.
        assert_eq!(f.reserved_bits(2, FlPte(1 << 13 | FlPte::P)), 0);
        // A 1-GiB page reserves bits 29:13.
        assert_eq!(
            f.reserved_bits(3, FlPte(1 << 29 | FlPte::PS | FlPte::P)),
            1 << 29
        );
        // Without FL1GP, PS in a PDPE is itself reserved.
        let no1g = FlFormat::new(46, false).unwrap();
        assert_eq!(
            no1g.reserved_bits(3, FlPte(FlPte::PS | FlPte::P)),
            FlPte::PS
        );
        assert_eq!(no1g.reserved_bits(0, FlPte(1)), 1);
    }

    #[test]
    fn address_width_is_validated() {
        assert_eq!(FlFormat::new(31, true), Err(InvalidAddressWidth(31)));
        assert_eq!(FlFormat::new(53, true), Err(InvalidAddressWidth(53)));
        assert!(FlFormat::new(52, true).is_ok());
        assert_eq!(
            FlFormat::new(52, true)
                .unwrap()
                .reserved_bits(1, FlPte(u64::MAX >> 12)),
            0
        );
    }

    #[test]
    fn canonical_addresses() {
        let four = FlPagingMode::FourLevel;
        assert!(four.is_canonical(0x0000_7fff_ffff_ffff));
        assert!(four.is_canonical(0xffff_8000_0000_0000));
        assert!(!four.is_canonical(0x0000_8000_0000_0000));
        assert!(!four.is_canonical(0xfff0_7fff_ffff_ffff));
        let five = FlPagingMode::FiveLevel;
        assert!(five.is_canonical(0x00ff_ffff_ffff_ffff));
        assert!(five.is_canonical(0xff00_0000_0000_0000));
        assert!(!five.is_canonical(0x0100_0000_0000_0000));
        assert_eq!(FlPagingMode::from_flpm(1), Some(five));
        assert_eq!(FlPagingMode::from_flpm(2), None);
        assert_eq!(five.flpm(), 1);
    }
}
