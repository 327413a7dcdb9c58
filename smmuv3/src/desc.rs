//! VMSAv8-64 translation table descriptors (Arm ARM D8, "Translation table descriptor
//! formats"), as the SMMU reads them for stage 1 (IHI 0070 §5.4, the CD's TTB0/TTB1) and
//! stage 2 (§5.2, the STE's S2TTB), with the 4 KiB, 16 KiB and 64 KiB granules.
//!
//! Levels are numbered as the Arm ARM numbers them: level 3 is the page table, each level
//! above resolves one stride (9, 11 or 13 bits). A block can sit at levels 1 and 2 with the
//! 4 KiB granule, level 2 with 16 KiB, level 2 with 64 KiB and level 1 too when the SMMU's
//! output size is 52 bits (FEAT_LPA); a block anywhere else and a level-3 entry with
//! `bits[1:0] = 01` are invalid (a Translation fault), as the Arm ARM requires. FEAT_LPA2
//! (TCR.DS) is not modelled.
//!
//! VMSAv8-64 has no reserved-field fault: bits a format does not use (the bits below the
//! granule in an address field, OA bits 51:48 outside the 52-bit 64 KiB format, the bits
//! of a block's address below its size, the ignored and software-defined fields) are
//! ignored. The output address is bits 47:granule; with the 64 KiB granule and a 52-bit
//! output size OA bits 51:48 come from bits 15:12. An output address above the configured
//! output size is an Address size fault, checked by the walkers.

use crate::field::{bits, get, put};
use crate::ste::Granule;
use crate::walk::PageSize;

/// How a table's descriptors are read: its granule, the output size in effect and whether
/// the SMMU's output size is 52 bits (IDR5.OAS, the SMMU's FEAT_LPA).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TableFormat {
    /// The translation granule.
    pub granule: Granule,
    /// The effective output size in bits (32 to 52; above 48 only with 64 KiB).
    pub output_bits: u32,
    /// The SMMU outputs 52 bits: 64 KiB-granule level-1 blocks (4 TiB) exist.
    pub lpa: bool,
}

impl TableFormat {
    /// The 4 KiB granule with a 48-bit output.
    pub const FOUR_K: TableFormat = TableFormat {
        granule: Granule::Size4K,
        output_bits: 48,
        lpa: false,
    };

    /// Whether OA bits 51:48 sit in descriptor bits 15:12 (64 KiB granule, 52-bit output).
    pub const fn oa52(self) -> bool {
        matches!(self.granule, Granule::Size64K) && self.output_bits > 48
    }
}

/// What a descriptor is at a given level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DescriptorKind {
    /// bit 0 clear, a block at level 0 or a reserved level-3 encoding: Translation fault.
    Invalid,
    /// A table descriptor (levels 0 to 2, `bits[1:0] = 11`): the next-level table's address.
    Table(u64),
    /// A block (levels 1 and 2, `bits[1:0] = 01`) or page (level 3, `bits[1:0] = 11`)
    /// descriptor: the output address of the first byte and the size mapped.
    Leaf {
        /// The output address of the first byte.
        base: u64,
        /// The size mapped.
        size: PageSize,
    },
}

/// One 64-bit VMSAv8-64 descriptor (stage 1 or stage 2; the attribute fields differ).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Descriptor(pub u64);

impl Descriptor {
    /// Valid.
    pub const VALID: u64 = 1 << 0;
    /// Table (levels 0-2) or page (level 3); clear for a block.
    pub const TABLE_OR_PAGE: u64 = 1 << 1;
    /// The output address field of a 48-bit output address, bits 47:12.
    pub const ADDR_MASK: u64 = bits(47, 12);

    // Stage-1 block and page attributes (Arm ARM D8, descriptor formats).
    /// Stage 1 `AttrIndx[2:0]`: the MAIR attribute index.
    pub const ATTR_INDX: u64 = bits(4, 2);
    /// Stage 1 `AP[1]`: unprivileged (EL0) access allowed.
    pub const AP_EL0: u64 = 1 << 6;
    /// Stage 1 `AP[2]`: read-only.
    pub const AP_RO: u64 = 1 << 7;
    /// Shareability, both stages.
    pub const SH: u64 = bits(9, 8);
    /// Access flag, both stages.
    pub const AF: u64 = 1 << 10;
    /// Stage 1 not-global: the translation is tagged with the ASID.
    pub const NG: u64 = 1 << 11;
    /// Dirty bit modifier, both stages: with hardware dirty-state management (HD, S2HD) a
    /// write to a writable-clean entry makes it writable-dirty instead of faulting.
    pub const DBM: u64 = 1 << 51;
    /// Contiguous hint, both stages.
    pub const CONTIGUOUS: u64 = 1 << 52;
    /// Stage 1 PXN: privileged execute-never.
    pub const PXN: u64 = 1 << 53;
    /// Stage 1 UXN: unprivileged execute-never.
    pub const UXN: u64 = 1 << 54;

    // Stage-1 table attributes (hierarchical controls, Arm ARM D8).
    /// PXNTable: privileged execute-never below this table.
    pub const PXN_TABLE: u64 = 1 << 59;
    /// UXNTable: unprivileged execute-never below this table.
    pub const UXN_TABLE: u64 = 1 << 60;
    /// `APTable[0]`: no unprivileged access below this table.
    pub const AP_TABLE_NO_EL0: u64 = 1 << 61;
    /// `APTable[1]`: no write access below this table.
    pub const AP_TABLE_RO: u64 = 1 << 62;

    // Stage-2 block and page attributes (Arm ARM D8, descriptor formats).
    /// Stage 2 `MemAttr[3:0]`.
    pub const MEM_ATTR: u64 = bits(5, 2);
    /// Stage 2 `S2AP[0]`: reads allowed.
    pub const S2AP_R: u64 = 1 << 6;
    /// Stage 2 `S2AP[1]`: writes allowed.
    pub const S2AP_W: u64 = 1 << 7;
    /// Stage 2 XN (`XN[1]` without FEAT_XNX): execute-never.
    pub const XN: u64 = 1 << 54;

    /// A table descriptor pointing to the 4 KiB-aligned table at `table` (below 2^48),
    /// with the stage-1 hierarchical controls in `attrs` (0 for stage 2).
    pub const fn table(table: u64, attrs: u64) -> Self {
        Descriptor((table & Self::ADDR_MASK) | attrs | Self::VALID | Self::TABLE_OR_PAGE)
    }

    /// A table descriptor in `fmt` pointing to the granule-aligned table at `table` (OA
    /// bits 51:48 in bits 15:12 in the 52-bit 64 KiB format).
    pub const fn table_in(fmt: TableFormat, table: u64, attrs: u64) -> Self {
        let oa52 = fmt.oa52();
        let attrs = if oa52 { attrs & !bits(15, 12) } else { attrs };
        let addr = table & bits(47, fmt.granule.shift());
        Descriptor(addr | attrs | Self::VALID | Self::TABLE_OR_PAGE | Self::high_oa(oa52, table))
    }

    /// A block or page descriptor mapping `base` with the attribute bits `attrs`, for the
    /// table format of `size`'s granule; the address bits below the size are dropped, and
    /// for a 64 KiB-granule size OA bits 51:48 go to bits 15:12 (the 52-bit format; a
    /// base below 2^48 leaves them clear).
    pub const fn leaf(base: u64, size: PageSize, attrs: u64) -> Self {
        let addr = base & Self::ADDR_MASK & !(size.bytes() - 1);
        let kind = if size.level() == 3 {
            Self::VALID | Self::TABLE_OR_PAGE
        } else {
            Self::VALID
        };
        let oa52 = matches!(size.granule(), Granule::Size64K);
        let attrs = attrs & !(Self::ADDR_MASK | 3);
        let attrs = if oa52 { attrs & !bits(15, 12) } else { attrs };
        Descriptor(addr | attrs | kind | Self::high_oa(oa52, base))
    }

    /// OA bits 51:48 of `addr` placed in bits 15:12, when `oa52`.
    const fn high_oa(oa52: bool, addr: u64) -> u64 {
        if oa52 {
            get(addr, 51, 48) << 12
        } else {
            0
        }
    }

    /// The address the descriptor holds in `fmt`: bits 47 down to the granule, with OA
    /// bits 51:48 from bits 15:12 in the 52-bit 64 KiB format. For a block it includes the
    /// (ignored) bits below the block size, which the Address size check sees.
    pub const fn address(self, fmt: TableFormat) -> u64 {
        let high = if fmt.oa52() {
            get(self.0, 15, 12) << 48
        } else {
            0
        };
        (self.0 & bits(47, fmt.granule.shift())) | high
    }

    /// What the descriptor is at `level` (0 to 3) of a 4 KiB-granule, 48-bit table.
    pub const fn kind(self, level: u8) -> DescriptorKind {
        self.decode(TableFormat::FOUR_K, level)
    }

    /// What the descriptor is at `level` (0 to 3) of a table in `fmt`.
    pub const fn decode(self, fmt: TableFormat, level: u8) -> DescriptorKind {
        if self.0 & Self::VALID == 0 || level > 3 {
            return DescriptorKind::Invalid;
        }
        let addr = self.address(fmt);
        if self.0 & Self::TABLE_OR_PAGE != 0 {
            return if level == 3 {
                DescriptorKind::Leaf {
                    base: addr,
                    size: fmt.granule.page_size(),
                }
            } else {
                DescriptorKind::Table(addr)
            };
        }
        match PageSize::of(fmt.granule, level, fmt.lpa) {
            Some(size) if level < 3 => DescriptorKind::Leaf {
                base: addr & !(size.bytes() - 1),
                size,
            },
            _ => DescriptorKind::Invalid,
        }
    }

    /// The bits of the output-address field (47:12) at or above `oa_bits` (32 to 48) that
    /// are set: nonzero means an Address size fault when the descriptor is used.
    pub const fn address_beyond(self, oa_bits: u32) -> u64 {
        self.0 & bits(47, 12) & !bits(oa_bits - 1, 0)
    }

    /// Whether the address the descriptor holds in `fmt` lies beyond the output size: an
    /// Address size fault when the descriptor is used.
    pub const fn address_beyond_in(self, fmt: TableFormat) -> bool {
        self.address(fmt) >> fmt.output_bits != 0
    }

    /// Stage 1 `AP[2:1]` as the two-bit field value.
    pub const fn ap(self) -> u64 {
        get(self.0, 7, 6)
    }

    /// Stage 2 `S2AP[1:0]` as the two-bit field value.
    pub const fn s2ap(self) -> u64 {
        get(self.0, 7, 6)
    }

    /// Stage 2 `MemAttr[3:0]`.
    pub const fn mem_attr(self) -> u64 {
        get(self.0, 5, 2)
    }

    /// Whether the stage-2 memory type is Device (`MemAttr[3:2] = 00`).
    pub const fn s2_device(self) -> bool {
        self.mem_attr() >> 2 == 0
    }

    /// Stage 1 `AP[2:1]` set to `ap`.
    pub const fn with_ap(self, ap: u64) -> Self {
        Descriptor((self.0 & !bits(7, 6)) | put(ap, 7, 6))
    }

    /// The flag bits `mask`, set.
    pub const fn has(self, mask: u64) -> bool {
        self.0 & mask == mask
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_encodings() {
        // A table at 0x4_5000 with APTable = 10 (read-only below) and UXNTable.
        let t = Descriptor::table(0x4_5000, Descriptor::AP_TABLE_RO | Descriptor::UXN_TABLE);
        assert_eq!(t.0, 0x5000_0000_0004_5003);
        assert_eq!(t.kind(0), DescriptorKind::Table(0x4_5000));
        assert_eq!(t.kind(2), DescriptorKind::Table(0x4_5000));
        // The same bits at level 3 are a page.
        assert_eq!(
            t.kind(3),
            DescriptorKind::Leaf {
                base: 0x4_5000,
                size: PageSize::Size4K
            }
        );
        // A 2 MiB block at 0x8040_0000, AF, AP = 01 (EL0 read/write), UXN, inner shareable.
        let b = Descriptor::leaf(
            0x8040_0000,
            PageSize::Size2M,
            Descriptor::AF | Descriptor::AP_EL0 | Descriptor::UXN | (3 << 8),
        );
        assert_eq!(b.0, 0x0040_0000_8040_0741);
        assert_eq!(
            b.kind(2),
            DescriptorKind::Leaf {
                base: 0x8040_0000,
                size: PageSize::Size2M
            }
        );
        assert_eq!(b.ap(), 0b01);
        // A 1 GiB block drops address bits below 1 GiB when decoded.
        let g = Descriptor(0x4000_0000 | 0x20_0000 | 1);
        assert_eq!(
            g.kind(1),
            DescriptorKind::Leaf {
                base: 0x4000_0000,
                size: PageSize::Size1G
            }
        );
        // A block at level 0 and a level-3 "block" are invalid.
        assert_eq!(g.kind(0), DescriptorKind::Invalid);
        assert_eq!(g.kind(3), DescriptorKind::Invalid);
        assert_eq!(Descriptor(0x4000_0002).kind(1), DescriptorKind::Invalid);
        // Stage 2: S2AP = 11, MemAttr = 1111 (normal write-back), XN.
        let s2 = Descriptor::leaf(
            0x1234_5000,
            PageSize::Size4K,
            Descriptor::S2AP_R | Descriptor::S2AP_W | (0xf << 2) | Descriptor::AF | Descriptor::XN,
        );
        assert_eq!(s2.0, 0x0040_0000_1234_54ff);
        assert_eq!(s2.s2ap(), 0b11);
        assert!(!s2.s2_device());
        assert!(Descriptor(0).s2_device());
    }

    #[test]
    fn address_size_and_ignored_bits() {
        let d = Descriptor(0x0000_8000_0000_0003);
        assert_eq!(d.address_beyond(48), 0);
        assert_eq!(d.address_beyond(40), 0x8000_0000_0000);
        // OA bits 51:48 are not part of the 4 KiB output address: ignored.
        let hi = Descriptor(0x000f_0000_0000_1003);
        assert_eq!(
            hi.kind(3),
            DescriptorKind::Leaf {
                base: 0x1000,
                size: PageSize::Size4K
            }
        );
        assert_eq!(hi.address_beyond(32), 0);
        assert_eq!(Descriptor(3).with_ap(0b10).0, 0x83);
    }
}
