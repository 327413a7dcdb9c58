//! Second-level paging entries (VT-d §9.8).
//!
//! Levels are numbered as the walkers number them: 5 = SL-PML5E, 4 = SL-PML4E,
//! 3 = SL-PDPE, 2 = SL-PDE, 1 = SL-PTE. An entry with R and W both clear is not present.

use crate::field::bits;
use crate::flpte::{check_address_width, InvalidAddressWidth};
use crate::pte;
use crate::walk::PageSize;

/// The number of second-level table levels, from the PASID entry's AW field (§9.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SlLevels {
    /// 3-level table, 39-bit input addresses (AW = 001b).
    Three,
    /// 4-level table, 48-bit input addresses (AW = 010b).
    Four,
    /// 5-level table, 57-bit input addresses (AW = 011b).
    Five,
}

impl SlLevels {
    /// The table depth an AW field value selects; other values are reserved in scalable
    /// mode.
    pub const fn from_aw(aw: u8) -> Option<Self> {
        match aw {
            1 => Some(SlLevels::Three),
            2 => Some(SlLevels::Four),
            3 => Some(SlLevels::Five),
            _ => None,
        }
    }

    /// The AW field value.
    pub const fn aw(self) -> u8 {
        match self {
            SlLevels::Three => 1,
            SlLevels::Four => 2,
            SlLevels::Five => 3,
        }
    }

    /// The number of levels walked.
    pub const fn levels(self) -> u8 {
        match self {
            SlLevels::Three => 3,
            SlLevels::Four => 4,
            SlLevels::Five => 5,
        }
    }

    /// The number of input-address bits translated; a wider input is fault SGN.4.
    pub const fn input_width(self) -> u32 {
        12 + 9 * self.levels() as u32
    }
}

/// A second-level paging entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SlPte(pub u64);

impl SlPte {
    /// Read permission.
    pub const R: u64 = 1 << 0;
    /// Write permission.
    pub const W: u64 = 1 << 1;
    /// Execute permission, used when the PASID entry's SLEE is 1.
    pub const X: u64 = 1 << 2;
    /// Extended memory type (leaf entries), bits 5:3.
    pub const EMT_MASK: u64 = bits(5, 3);
    /// Ignore PAT (leaf entries).
    pub const IPAT: u64 = 1 << 6;
    /// Page size (SL-PDPE, SL-PDE): the entry maps a 1-GiB or 2-MiB page.
    pub const PS: u64 = pte::PS;
    /// Accessed: set by hardware when SLADE is 1.
    pub const A: u64 = 1 << 8;
    /// Dirty (leaf entries): set by hardware on writes when SLADE is 1.
    pub const D: u64 = 1 << 9;
    /// Snoop (leaf entries): force snooping; needs snoop control (ECAP_REG.SC).
    pub const SNP: u64 = 1 << 11;
    /// Transient mapping (leaf entries): a hint for device-TLBs; needs ECAP_REG.DT.
    pub const TM: u64 = 1 << 62;
    /// The address field, bits 51:12.
    pub const ADDR_MASK: u64 = pte::ADDR_MASK;

    /// An entry pointing to the next table at `table` (4-KiB aligned) with `flags` (R, W, X,
    /// A, ...). Give R or W, or the entry is not present.
    pub const fn table(table: u64, flags: u64) -> Self {
        SlPte(pte::table(table, flags))
    }

    /// A leaf entry mapping the page of `size` at `page` with `flags`; sets PS for large
    /// pages. `flags` may use every bit but the page's address bits.
    pub const fn page(page: u64, size: PageSize, flags: u64) -> Self {
        SlPte(pte::page(page, size, flags))
    }

    /// Present: R or W set.
    pub const fn present(self) -> bool {
        self.0 & (Self::R | Self::W) != 0
    }

    /// R.
    pub const fn readable(self) -> bool {
        self.0 & Self::R != 0
    }

    /// W.
    pub const fn writable(self) -> bool {
        self.0 & Self::W != 0
    }

    /// X.
    pub const fn executable(self) -> bool {
        self.0 & Self::X != 0
    }

    /// A.
    pub const fn accessed(self) -> bool {
        self.0 & Self::A != 0
    }

    /// D.
    pub const fn dirty(self) -> bool {
        self.0 & Self::D != 0
    }

    /// EMT, the extended memory type of a leaf.
    pub const fn emt(self) -> u8 {
        ((self.0 & Self::EMT_MASK) >> 3) as u8
    }

    /// Whether the entry at `level` maps a page (an SL-PTE, or an SL-PDPE/SL-PDE with PS
    /// set) rather than pointing to a table.
    pub const fn is_leaf(self, level: u8) -> bool {
        pte::is_leaf(self.0, level)
    }

    /// The next table's address (bits 51:12).
    pub const fn table_address(self) -> u64 {
        self.0 & Self::ADDR_MASK
    }

    /// The mapped page's base address for a leaf of `size`.
    pub const fn page_address(self, size: PageSize) -> u64 {
        pte::page_address(self.0, size)
    }
}

/// The reserved-bit layout of second-level entries for one IOMMU configuration.
///
/// The reserved bits of every level, with PS clear and set, are computed when the format
/// is made, so that a walker checks an entry with one mask compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SlFormat {
    address_width: u8,
    two_mib_pages: bool,
    one_gib_pages: bool,
    snoop_control: bool,
    transient_mapping: bool,
    /// The reserved-bit mask of level `i / 2` with PS equal to `i % 2`; level 0 (no such
    /// level) reserves every bit.
    masks: pte::ReservedMasks,
}

impl SlFormat {
    /// The format for output addresses of `address_width` bits (the host address width;
    /// bits 51 down to it are reserved), with every optional feature supported: 2-MiB and
    /// 1-GiB pages (CAP_REG.SLLPS), SNP (ECAP_REG.SC) and TM (ECAP_REG.DT).
    pub const fn new(address_width: u8) -> Result<Self, InvalidAddressWidth> {
        match check_address_width(address_width) {
            Ok(address_width) => Ok(SlFormat {
                address_width,
                two_mib_pages: true,
                one_gib_pages: true,
                snoop_control: true,
                transient_mapping: true,
                masks: [0; 12],
            }
            .with_masks()),
            Err(e) => Err(e),
        }
    }

    /// The format with its mask table computed from its fields (§9.8's reserved bits):
    /// the address bits above the width at every level; SNP and TM in non-leaf
    /// entries, and in leaves without snoop control or device-TLB support; the address bits
    /// below a large page's size; PS where no page can be mapped (levels 4 and 5, and a
    /// large-page size that is not supported).
    const fn with_masks(self) -> Self {
        let above_width = bits(51, self.address_width as u32);
        let mut leaf_extra = 0;
        if !self.snoop_control {
            leaf_extra |= SlPte::SNP;
        }
        if !self.transient_mapping {
            leaf_extra |= SlPte::TM;
        }
        let non_leaf = above_width | SlPte::SNP | SlPte::TM;
        let unsupported = above_width | SlPte::PS;
        let two_mib = if self.two_mib_pages {
            above_width | bits(20, 12) | leaf_extra
        } else {
            unsupported
        };
        let one_gib = if self.one_gib_pages {
            above_width | bits(29, 12) | leaf_extra
        } else {
            unsupported
        };
        let level_1 = above_width | leaf_extra;
        SlFormat {
            masks: [
                u64::MAX,
                u64::MAX,
                level_1,
                level_1,
                non_leaf,
                two_mib,
                non_leaf,
                one_gib,
                non_leaf | SlPte::PS,
                non_leaf | SlPte::PS,
                non_leaf | SlPte::PS,
                non_leaf | SlPte::PS,
            ],
            ..self
        }
    }

    /// The same format with the given large-page support (CAP_REG.SLLPS bits 0 and 1). PS in
    /// an entry of an unsupported size is a reserved bit.
    pub const fn with_large_pages(self, two_mib: bool, one_gib: bool) -> Self {
        SlFormat {
            two_mib_pages: two_mib,
            one_gib_pages: one_gib,
            ..self
        }
        .with_masks()
    }

    /// The same format with or without snoop control; without it SNP is reserved.
    pub const fn with_snoop_control(self, snoop_control: bool) -> Self {
        SlFormat {
            snoop_control,
            ..self
        }
        .with_masks()
    }

    /// The same format with or without device-TLB support; without it TM is reserved.
    pub const fn with_transient_mapping(self, transient_mapping: bool) -> Self {
        SlFormat {
            transient_mapping,
            ..self
        }
        .with_masks()
    }

    /// The address width.
    pub const fn address_width(&self) -> u8 {
        self.address_width
    }

    /// Whether pages of `size` can be mapped.
    pub const fn supports(&self, size: PageSize) -> bool {
        match size {
            PageSize::Size4K => true,
            PageSize::Size2M => self.two_mib_pages,
            PageSize::Size1G => self.one_gib_pages,
        }
    }

    /// The bits of `pte` that are reserved at `level` and set: non-zero means fault SSL.3.
    /// SNP and TM are reserved in non-leaf entries; at a level outside 1..=5 every bit is
    /// reserved.
    #[inline(always)]
    pub const fn reserved_bits(&self, level: u8, pte: SlPte) -> u64 {
        pte.0 & self.reserved(level, pte.0)
    }

    /// The bits an entry pointing to a table (levels 2 to 5) must have clear: its reserved
    /// bits, the same at every level (§9.8: the address bits above the width, SNP and TM),
    /// and PS, which makes an entry at level 2 or 3 a leaf and is reserved above.
    #[inline(always)]
    pub(crate) const fn table_mask(&self) -> u64 {
        self.masks[4] | SlPte::PS
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
        let pte = SlPte::table(0x7_f00d_0000, SlPte::R | SlPte::W | SlPte::X);
        assert_eq!(pte.0, 0x0000_0007_f00d_0007);
        assert!(pte.present() && pte.readable() && pte.writable() && pte.executable());
        assert!(!pte.is_leaf(2) && !pte.is_leaf(3));
        assert_eq!(pte.table_address(), 0x7_f00d_0000);
    }

    #[test]
    fn page_entries_match_hand_encoding() {
        // 4 KiB: R | W | EMT=6 (WB) | IPAT | A | D | SNP, address 0x1_2345_6000.
        let pte = SlPte::page(
            0x1_2345_6000,
            PageSize::Size4K,
            SlPte::R | SlPte::W | 6 << 3 | SlPte::IPAT | SlPte::A | SlPte::D | SlPte::SNP,
        );
        assert_eq!(pte.0, 0x0000_0001_2345_6b73);
        assert_eq!(pte.emt(), 6);
        assert!(pte.accessed() && pte.dirty() && pte.is_leaf(1));
        assert_eq!(pte.page_address(PageSize::Size4K), 0x1_2345_6000);

        // 2 MiB read-only with TM: R | PS | TM, address 0x8060_0000.
        let pte = SlPte::page(0x8060_0000, PageSize::Size2M, SlPte::R | SlPte::TM);
        assert_eq!(pte.0, 0x4000_0000_8060_0081);
        assert!(pte.is_leaf(2) && !pte.writable());

        // 1 GiB write-only: W | PS, address 0x40_0000_0000.
        let pte = SlPte::page(0x40_0000_0000, PageSize::Size1G, SlPte::W);
        assert_eq!(pte.0, 0x0000_0040_0000_0082);
        assert!(pte.present() && !pte.readable());
        assert_eq!(pte.page_address(PageSize::Size1G), 0x40_0000_0000);
    }

    #[test]
    fn not_present_without_read_and_write() {
        assert!(!SlPte(SlPte::X | SlPte::A | 0x1000).present());
        assert!(SlPte(SlPte::W).present());
    }

    #[test]
    fn table_mask_is_every_non_leaf_levels_mask_and_ps() {
        let base = SlFormat::new(39).unwrap();
        let formats = [
            base,
            SlFormat::new(48).unwrap(),
            base.with_large_pages(false, false),
            base.with_large_pages(true, false),
            base.with_snoop_control(false).with_transient_mapping(false),
        ];
        for f in formats {
            for level in 2..=5 {
                assert_eq!(
                    f.table_mask(),
                    f.reserved(level, 0) | SlPte::PS,
                    "level {level}"
                );
            }
        }
    }

    #[test]
    fn reserved_bits_per_level() {
        let f = SlFormat::new(39).unwrap();
        for level in 1..=5 {
            assert_eq!(f.reserved_bits(level, SlPte(SlPte::R | 1 << 39)), 1 << 39);
            // Bits 63 and 61:52 are ignored everywhere.
            assert_eq!(
                f.reserved_bits(level, SlPte(SlPte::R | 1 << 63 | bits(61, 52))),
                0
            );
        }
        // SNP and TM are reserved in non-leaf entries, allowed in leaves.
        for level in 2..=5 {
            let e = SlPte(SlPte::R | SlPte::SNP | SlPte::TM);
            assert_eq!(f.reserved_bits(level, e), SlPte::SNP | SlPte::TM);
        }
        assert_eq!(
            f.reserved_bits(1, SlPte(SlPte::R | SlPte::SNP | SlPte::TM)),
            0
        );
        // PS is reserved at levels 4 and 5.
        assert_eq!(f.reserved_bits(4, SlPte(SlPte::R | SlPte::PS)), SlPte::PS);
        // Large pages reserve their low address bits, down to bit 12.
        assert_eq!(
            f.reserved_bits(2, SlPte(SlPte::R | SlPte::PS | 1 << 12)),
            1 << 12
        );
        assert_eq!(
            f.reserved_bits(3, SlPte(SlPte::R | SlPte::PS | 1 << 29)),
            1 << 29
        );
        // Without the features, SNP, TM and the large page sizes are reserved.
        let bare = f
            .with_snoop_control(false)
            .with_transient_mapping(false)
            .with_large_pages(false, false);
        assert_eq!(
            bare.reserved_bits(1, SlPte(SlPte::R | SlPte::SNP)),
            SlPte::SNP
        );
        assert_eq!(
            bare.reserved_bits(1, SlPte(SlPte::R | SlPte::TM)),
            SlPte::TM
        );
        assert_eq!(
            bare.reserved_bits(2, SlPte(SlPte::R | SlPte::PS)),
            SlPte::PS
        );
        assert_eq!(
            bare.reserved_bits(3, SlPte(SlPte::R | SlPte::PS)),
            SlPte::PS
        );
        assert!(!bare.supports(PageSize::Size2M) && bare.supports(PageSize::Size4K));
        assert_eq!(bare.reserved_bits(6, SlPte(SlPte::R)), SlPte::R);
    }

    #[test]
    fn levels_from_aw() {
        assert_eq!(SlLevels::from_aw(2), Some(SlLevels::Four));
        assert_eq!(SlLevels::from_aw(0), None);
        assert_eq!(SlLevels::from_aw(4), None);
        assert_eq!(SlLevels::Three.input_width(), 39);
        assert_eq!(SlLevels::Five.input_width(), 57);
        assert_eq!(SlLevels::Five.aw(), 3);
    }
}
