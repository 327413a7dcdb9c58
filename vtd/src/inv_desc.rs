//! Invalidation descriptors of the invalidation queue (VT-d §6.5.2), in their 256-bit form.
//!
//! Software queues descriptors to tell the remapping hardware which cached translations to
//! drop. Both VT-d implementations of vsva use this module: the host IOMMU driver encodes
//! descriptors and the physical model decodes them; the guest driver's descriptors are
//! decoded by the vIOMMU. Decoding rejects unknown types and set reserved bits, which the
//! hardware reports as an invalidation queue error (FSTS.IQE).
//!
//! The type code is split over bits 3:0 (low) and 11:9 (high) of the first quadword.
//! Every descriptor is 256 bits (IQA_REG.DW = 1); bits 255:128 are reserved for all
//! descriptors except the page group response, which carries private data there.

use crate::addr::{DomainId, Pasid, SourceId};
use crate::field::field_enum;

/// Log2 of the 4-KiB page that invalidation addresses are counted in.
const PAGE_SHIFT: u32 = 12;
/// Bits 63:12: a page-aligned address field.
const ADDR_MASK: u64 = !0xfff;

/// The type code of an invalidation descriptor (§6.5.2, table "Invalidation Descriptor
/// Types").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum InvDescType {
    /// Context-cache invalidate (§6.5.2.1).
    ContextCache = 1,
    /// IOTLB invalidate (§6.5.2.3).
    Iotlb = 2,
    /// Device-TLB invalidate (§6.5.2.5).
    DevIotlb = 3,
    /// Interrupt entry cache invalidate (§6.5.2.7).
    InterruptEntryCache = 4,
    /// Invalidation wait (§6.5.2.8).
    InvWait = 5,
    /// PASID-based IOTLB invalidate (§6.5.2.4).
    PasidIotlb = 6,
    /// PASID-cache invalidate (§6.5.2.2).
    PasidCache = 7,
    /// PASID-based device-TLB invalidate (§6.5.2.6).
    PasidDevIotlb = 8,
    /// Page group response (§6.5.2.9; answers a page request, §7.7).
    PageGroupResponse = 9,
}

impl InvDescType {
    /// The descriptor type a 7-bit type code names, if any.
    pub const fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => Self::ContextCache,
            2 => Self::Iotlb,
            3 => Self::DevIotlb,
            4 => Self::InterruptEntryCache,
            5 => Self::InvWait,
            6 => Self::PasidIotlb,
            7 => Self::PasidCache,
            8 => Self::PasidDevIotlb,
            9 => Self::PageGroupResponse,
            _ => return None,
        })
    }

    /// The 7-bit type code.
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// The spec's name of the descriptor.
    pub const fn name(self) -> &'static str {
        match self {
            Self::ContextCache => "context-cache invalidate",
            Self::Iotlb => "IOTLB invalidate",
            Self::DevIotlb => "device-TLB invalidate",
            Self::InterruptEntryCache => "interrupt entry cache invalidate",
            Self::InvWait => "invalidation wait",
            Self::PasidIotlb => "PASID-based IOTLB invalidate",
            Self::PasidCache => "PASID-cache invalidate",
            Self::PasidDevIotlb => "PASID-based device-TLB invalidate",
            Self::PageGroupResponse => "page group response",
        }
    }

    /// Reserved bits of each quadword: set in a fetched descriptor, they make it invalid.
    const fn reserved(self) -> [u64; 4] {
        const ALL: u64 = !0;
        match self {
            Self::ContextCache => [0xfffc_0000_0000_f1c0, ALL, ALL, ALL],
            Self::Iotlb => [0xffff_ffff_0000_f100, 0xf80, ALL, ALL],
            Self::DevIotlb => [0x000f_0000_ffe0_01f0, 0xffe, ALL, ALL],
            Self::InterruptEntryCache => [0xffff_0000_07ff_f1e0, ALL, ALL, ALL],
            Self::InvWait => [0x0000_0000_ffff_f100, 0x3, ALL, ALL],
            Self::PasidIotlb => [0xfff0_0000_0000_f1c0, 0xf80, ALL, ALL],
            Self::PasidCache => [0xfff0_0000_0000_f1c0, ALL, ALL, ALL],
            Self::PasidDevIotlb => [0, 0x7fe, ALL, ALL],
            Self::PageGroupResponse => [0xfff0_0000_0000_01c0, 0xffff_ffff_ffff_f003, 0, 0],
        }
    }
}

impl std::fmt::Display for InvDescType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a descriptor could not be decoded (or encoded).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvDescError {
    /// The type code names no descriptor (IQERCD.IQEI "invalid descriptor type").
    #[error("unknown invalidation descriptor type {0}")]
    UnknownType(u8),
    /// Reserved bits are set (IQERCD.IQEI "reserved field violation").
    #[error("{kind} descriptor: reserved bits {bits:#x} set in quadword {qword}")]
    Reserved {
        /// Type of the rejected descriptor.
        kind: InvDescType,
        /// Index (0..=3) of the 64-bit quadword holding the bits.
        qword: usize,
        /// The reserved bits found set in that quadword.
        bits: u64,
    },
    /// A field holds a value the spec reserves, such as granularity 0 of a context-cache
    /// invalidation (also a reserved field violation).
    #[error("{kind} descriptor: reserved value {value:#x} in field {field}")]
    ReservedValue {
        /// Type of the rejected descriptor.
        kind: InvDescType,
        /// The spec's name of the field, such as "G".
        field: &'static str,
        /// The reserved value the field holds.
        value: u64,
    },
    /// Encoding only: a field value does not fit its bits (or an address is not aligned as
    /// the field requires).
    #[error("{kind} descriptor: value {value:#x} does not fit field {field}")]
    FieldRange {
        /// Type of the descriptor being encoded.
        kind: InvDescType,
        /// The spec's name of the field, such as "AM" or "ADDR".
        field: &'static str,
        /// The value that does not fit (the whole address for an alignment error).
        value: u64,
    },
}

field_enum! {
    /// Context-cache invalidation granularity (§6.5.2.1, field G).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub enum ContextCacheGranularity {
        /// All context entries.
        Global = 1,
        /// Entries tagged with the domain id.
        DomainSelective = 2,
        /// Entries of the source id (with the function mask) in the domain.
        DeviceSelective = 3,
    }
}

impl ContextCacheGranularity {
    /// Whether a context-cache invalidation of this granularity, naming `sid` with function
    /// mask `fm`, removes the cached context entry of requester `rid` (§6.5.2.1).
    ///
    /// Scalable-mode context entries carry no domain id (§9.4), so a domain-selective
    /// invalidation removes them all, as a global one does. A device-selective one ignores
    /// the low function bits FM names: 00b none, 01b bit 2, 10b bits 2:1, 11b bits 2:0.
    pub const fn covers(self, sid: SourceId, fm: u8, rid: SourceId) -> bool {
        match self {
            Self::Global | Self::DomainSelective => true,
            Self::DeviceSelective => {
                let ignored: u16 = match fm & 3 {
                    0 => 0,
                    1 => 0b100,
                    2 => 0b110,
                    _ => 0b111,
                };
                rid.rid() & !ignored == sid.rid() & !ignored
            }
        }
    }
}

field_enum! {
    /// IOTLB invalidation granularity (§6.5.2.3, field G).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub enum IotlbGranularity {
        /// All IOTLB entries (and paging-structure caches).
        Global = 1,
        /// Entries tagged with the domain id.
        DomainSelective = 2,
        /// Entries of the domain for the 2^AM pages at the address.
        PageSelective = 3,
    }
}

field_enum! {
    /// PASID-cache invalidation granularity (§6.5.2.2, field G).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub enum PasidCacheGranularity {
        /// Entries tagged with the domain id.
        DomainSelective = 0,
        /// Entries of the PASID in the domain.
        PasidSelective = 1,
        /// All PASID-cache entries.
        Global = 3,
    }
}

field_enum! {
    /// PASID-based IOTLB invalidation granularity (§6.5.2.4, field G).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub enum PasidIotlbGranularity {
        /// All entries of the PASID in the domain (global-page entries excepted).
        PasidSelective = 2,
        /// Entries of the PASID in the domain for the 2^AM pages at the address.
        PageSelectiveWithinPasid = 3,
    }
}

field_enum! {
    /// Interrupt entry cache invalidation granularity (§6.5.2.7, field G).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub enum IecGranularity {
        /// All interrupt remapping entries.
        Global = 0,
        /// The 2^IM entries from the interrupt index.
        IndexSelective = 1,
    }
}

field_enum! {
    /// Response code of a page group response (§6.5.2.9; PCIe PRG Response Message).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub enum ResponseCode {
        /// The pages are mapped: the device retries the requests.
        Success = 0,
        /// The request is invalid: the device reports it as a failed translation.
        InvalidRequest = 1,
        /// A catastrophic failure: the device disables its page request interface.
        ResponseFailure = 0xf,
    }
}

/// A decoded 256-bit invalidation descriptor (§6.5.2).
///
/// Fields are the descriptor's own; fields a granularity does not use (for example the
/// address of a domain-selective IOTLB invalidation) are kept as written, so that encoding
/// a decoded descriptor gives back the same bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InvDesc {
    /// Context-cache invalidate (§6.5.2.1).
    ContextCache {
        /// Granularity (G, bits 5:4).
        granularity: ContextCacheGranularity,
        /// Domain-ID (DID, bits 31:16): the domain to invalidate, for domain- and
        /// device-selective granularity.
        did: DomainId,
        /// Source-ID (SID, bits 47:32): the device, for device-selective granularity.
        sid: SourceId,
        /// Function mask (FM, 2 bits): low bits of the function number to ignore.
        fm: u8,
    },
    /// IOTLB invalidate (§6.5.2.3): requests without PASID (second-level mappings).
    Iotlb {
        /// Granularity (G, bits 5:4).
        granularity: IotlbGranularity,
        /// Drain reads.
        dr: bool,
        /// Drain writes.
        dw: bool,
        /// Domain-ID (DID, bits 31:16), for domain- and page-selective granularity.
        did: DomainId,
        /// Page-aligned input address.
        addr: u64,
        /// Invalidation hint: only leaf entries changed.
        ih: bool,
        /// Address mask (6 bits): 2^AM pages.
        am: u8,
    },
    /// Device-TLB invalidate (§6.5.2.5): forwarded to the device as an ATS invalidation.
    DevIotlb {
        /// Source-ID (SID, bits 47:32) of the device whose device-TLB is invalidated.
        sid: SourceId,
        /// Source id of the physical function (for SR-IOV virtual functions).
        pfsid: SourceId,
        /// Max invalidations pending (MIP, 5 bits).
        max_invs_pend: u8,
        /// Page-aligned address; with `size`, low address bits encode the range.
        addr: u64,
        /// Size bit S: the range is larger than one page (ATS encoding).
        size: bool,
    },
    /// Interrupt entry cache invalidate (§6.5.2.7).
    InterruptEntryCache {
        /// Granularity (G, bit 4).
        granularity: IecGranularity,
        /// Index mask (IM, 5 bits): 2^IM entries.
        index_mask: u8,
        /// Interrupt index.
        index: u16,
    },
    /// Invalidation wait (§6.5.2.8).
    InvWait {
        /// Status write: write `status_data` to `status_addr` on completion.
        sw: bool,
        /// Interrupt flag: set ICS.IWC and raise an invalidation completion event.
        interrupt: bool,
        /// Fence: later descriptors wait for this one and all before it.
        fence: bool,
        /// Page-request drain.
        pd: bool,
        /// Status data (bits 63:32): the 32-bit value written to `status_addr`.
        status_data: u32,
        /// 4-byte aligned address of the status write.
        status_addr: u64,
    },
    /// PASID-cache invalidate (§6.5.2.2).
    PasidCache {
        /// Granularity (G, bits 5:4).
        granularity: PasidCacheGranularity,
        /// Domain-ID (DID, bits 31:16), for domain- and PASID-selective granularity.
        did: DomainId,
        /// PASID (bits 51:32), for PASID-selective granularity.
        pasid: Pasid,
    },
    /// PASID-based IOTLB invalidate (§6.5.2.4): first-level and nested mappings.
    PasidIotlb {
        /// Granularity (G, bits 5:4).
        granularity: PasidIotlbGranularity,
        /// Domain-ID (DID, bits 31:16).
        did: DomainId,
        /// PASID (bits 51:32) whose entries are invalidated.
        pasid: Pasid,
        /// Page-aligned input address.
        addr: u64,
        /// Invalidation hint: only leaf entries changed.
        ih: bool,
        /// Address mask (6 bits): 2^AM pages.
        am: u8,
    },
    /// PASID-based device-TLB invalidate (§6.5.2.6).
    PasidDevIotlb {
        /// Source-ID (SID, bits 31:16) of the device whose device-TLB is invalidated.
        sid: SourceId,
        /// Source id of the physical function (PFSID; for SR-IOV virtual functions).
        pfsid: SourceId,
        /// PASID (bits 51:32) whose device-TLB entries are invalidated.
        pasid: Pasid,
        /// Max invalidations pending (MIP, 5 bits).
        max_invs_pend: u8,
        /// Page-aligned address; with `size`, low address bits encode the range.
        addr: u64,
        /// Size bit S (ATS encoding).
        size: bool,
        /// Global bit G: also invalidate global mappings of all PASIDs.
        global: bool,
    },
    /// Page group response (§6.5.2.9).
    PageGroupResponse {
        /// Requester id of the device the response goes to.
        rid: SourceId,
        /// PASID present (PP): the response carries `pasid`.
        pasid_present: bool,
        /// PASID (bits 51:32) of the page request answered, when `pasid_present`.
        pasid: Pasid,
        /// Private data present (PDP): `private_data` goes back to the device.
        private_data_present: bool,
        /// Response code (bits 15:12).
        response: ResponseCode,
        /// Last page in group (LPIG).
        last_page_in_group: bool,
        /// Page request group index (PRGI, 9 bits).
        prg_index: u16,
        /// The private data of the page request (bits 255:128).
        private_data: [u64; 2],
    },
}

/// An inclusive range of input addresses an invalidation covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AddrRange {
    /// First byte.
    pub start: u64,
    /// Last byte (inclusive, so the whole address space fits).
    pub last: u64,
}

impl AddrRange {
    /// The naturally aligned block of 2^`am` 4-KiB pages that holds `addr` (§6.5.2.3:
    /// hardware ignores the low AM bits of the page number).
    pub const fn from_address_mask(addr: u64, am: u8) -> Self {
        Self::aligned_block(addr, PAGE_SHIFT + am as u32)
    }

    /// The range of a device-TLB invalidation (§6.5.2.5, PCIe ATS): one page when `size` is
    /// clear; otherwise the lowest clear bit N of the page-aligned address (N >= 12)
    /// makes the range 2^(N+1) bytes, naturally aligned.
    pub const fn from_ats_size(addr: u64, size: bool) -> Self {
        if !size {
            return Self::aligned_block(addr, PAGE_SHIFT);
        }
        let ones = (addr | !ADDR_MASK).trailing_ones();
        Self::aligned_block(addr, ones + 1)
    }

    /// The 2^`log2` byte block holding `addr`; the whole space when `log2` >= 64.
    const fn aligned_block(addr: u64, log2: u32) -> Self {
        if log2 >= u64::BITS {
            return Self {
                start: 0,
                last: u64::MAX,
            };
        }
        let span = (1u64 << log2) - 1;
        Self {
            start: addr & !span,
            last: (addr & !span) | span,
        }
    }

    /// Whether `addr` lies in the range.
    pub const fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr <= self.last
    }

    /// Whether the range shares a byte with `start..=last`.
    pub const fn overlaps(&self, start: u64, last: u64) -> bool {
        self.start <= last && start <= self.last
    }
}

/// Bits `lo + width - 1 : lo` of `qw`.
const fn field(qw: u64, lo: u32, width: u32) -> u64 {
    (qw >> lo) & ((1u64 << width) - 1)
}

const fn bit(qw: u64, n: u32) -> bool {
    qw & (1 << n) != 0
}

/// The 20-bit PASID field at bits 51:32.
fn pasid_field(qw: u64) -> Pasid {
    Pasid::from_low_bits(qw >> 32)
}

/// PFSID is split: bits 3:0 at 15:12, bits 15:4 at 63:52.
fn pfsid_field(qw: u64) -> SourceId {
    SourceId::from_rid((field(qw, 12, 4) | (field(qw, 52, 12) << 4)) as u16)
}

fn pfsid_bits(pfsid: SourceId) -> u64 {
    let rid = pfsid.rid() as u64;
    ((rid & 0xf) << 12) | ((rid >> 4) << 52)
}

/// Type code bits of the first quadword.
const fn type_bits(kind: InvDescType) -> u64 {
    let code = kind.code() as u64;
    (code & 0xf) | ((code >> 4) << 9)
}

/// Checks that `value` fits in `width` bits, for encoding.
fn fits(
    kind: InvDescType,
    field: &'static str,
    value: u64,
    width: u32,
) -> Result<u64, InvDescError> {
    if value >> width == 0 {
        Ok(value)
    } else {
        Err(InvDescError::FieldRange { kind, field, value })
    }
}

/// Checks that `addr` has none of `low` set, for encoding.
fn aligned(
    kind: InvDescType,
    field: &'static str,
    addr: u64,
    low: u64,
) -> Result<u64, InvDescError> {
    if addr & low == 0 {
        Ok(addr)
    } else {
        Err(InvDescError::FieldRange {
            kind,
            field,
            value: addr,
        })
    }
}

impl InvDesc {
    /// The descriptor's type.
    pub const fn desc_type(&self) -> InvDescType {
        match self {
            Self::ContextCache { .. } => InvDescType::ContextCache,
            Self::Iotlb { .. } => InvDescType::Iotlb,
            Self::DevIotlb { .. } => InvDescType::DevIotlb,
            Self::InterruptEntryCache { .. } => InvDescType::InterruptEntryCache,
            Self::InvWait { .. } => InvDescType::InvWait,
            Self::PasidCache { .. } => InvDescType::PasidCache,
            Self::PasidIotlb { .. } => InvDescType::PasidIotlb,
            Self::PasidDevIotlb { .. } => InvDescType::PasidDevIotlb,
            Self::PageGroupResponse { .. } => InvDescType::PageGroupResponse,
        }
    }

    /// The input-address range a page-selective or device-TLB invalidation covers; `None`
    /// for descriptors that are not address based.
    pub const fn range(&self) -> Option<AddrRange> {
        match *self {
            Self::Iotlb {
                granularity: IotlbGranularity::PageSelective,
                addr,
                am,
                ..
            }
            | Self::PasidIotlb {
                granularity: PasidIotlbGranularity::PageSelectiveWithinPasid,
                addr,
                am,
                ..
            } => Some(AddrRange::from_address_mask(addr, am)),
            Self::DevIotlb { addr, size, .. } | Self::PasidDevIotlb { addr, size, .. } => {
                Some(AddrRange::from_ats_size(addr, size))
            }
            _ => None,
        }
    }

    /// Global context-cache, PASID-cache and IOTLB invalidations, in that order: every
    /// translation cache of the unit emptied (as a driver does after setting the root
    /// table). `dr`/`dw` are the IOTLB descriptor's drain hints (CAP.DRD/DWD).
    pub const fn global_flush(dr: bool, dw: bool) -> [InvDesc; 3] {
        [
            InvDesc::ContextCache {
                granularity: ContextCacheGranularity::Global,
                did: DomainId(0),
                sid: SourceId::from_rid(0),
                fm: 0,
            },
            InvDesc::PasidCache {
                granularity: PasidCacheGranularity::Global,
                did: DomainId(0),
                pasid: Pasid::RID_PASID,
            },
            InvDesc::global_iotlb(dr, dw),
        ]
    }

    /// Global IOTLB invalidation: every IOTLB and paging-structure-cache entry of the unit
    /// (§6.5.2.3). `dr`/`dw` are the drain hints (CAP.DRD/DWD).
    pub const fn global_iotlb(dr: bool, dw: bool) -> InvDesc {
        InvDesc::Iotlb {
            granularity: IotlbGranularity::Global,
            dr,
            dw,
            did: DomainId(0),
            addr: 0,
            ih: false,
            am: 0,
        }
    }

    /// Decodes a descriptor fetched from the invalidation queue.
    pub fn decode(raw: [u64; 4]) -> Result<Self, InvDescError> {
        let code = (field(raw[0], 0, 4) | (field(raw[0], 9, 3) << 4)) as u8;
        let kind = InvDescType::from_code(code).ok_or(InvDescError::UnknownType(code))?;
        for (qword, (word, reserved)) in raw.iter().zip(kind.reserved()).enumerate() {
            let bits = word & reserved;
            if bits != 0 {
                return Err(InvDescError::Reserved { kind, qword, bits });
            }
        }
        let [q0, q1, q2, q3] = raw;
        let reserved_value =
            |field: &'static str, value: u64| InvDescError::ReservedValue { kind, field, value };
        let g = field(q0, 4, 2);
        let did = DomainId(field(q0, 16, 16) as u16);
        Ok(match kind {
            InvDescType::ContextCache => Self::ContextCache {
                granularity: ContextCacheGranularity::from_bits(g)
                    .ok_or_else(|| reserved_value("G", g))?,
                did,
                sid: SourceId::from_rid(field(q0, 32, 16) as u16),
                fm: field(q0, 48, 2) as u8,
            },
            InvDescType::Iotlb => Self::Iotlb {
                granularity: IotlbGranularity::from_bits(g)
                    .ok_or_else(|| reserved_value("G", g))?,
                dw: bit(q0, 6),
                dr: bit(q0, 7),
                did,
                addr: q1 & ADDR_MASK,
                ih: bit(q1, 6),
                am: field(q1, 0, 6) as u8,
            },
            InvDescType::DevIotlb => Self::DevIotlb {
                sid: SourceId::from_rid(field(q0, 32, 16) as u16),
                pfsid: pfsid_field(q0),
                max_invs_pend: field(q0, 16, 5) as u8,
                addr: q1 & ADDR_MASK,
                size: bit(q1, 0),
            },
            InvDescType::InterruptEntryCache => Self::InterruptEntryCache {
                granularity: if bit(q0, 4) {
                    IecGranularity::IndexSelective
                } else {
                    IecGranularity::Global
                },
                index_mask: field(q0, 27, 5) as u8,
                index: field(q0, 32, 16) as u16,
            },
            InvDescType::InvWait => Self::InvWait {
                interrupt: bit(q0, 4),
                sw: bit(q0, 5),
                fence: bit(q0, 6),
                pd: bit(q0, 7),
                status_data: field(q0, 32, 32) as u32,
                status_addr: q1 & !0x3,
            },
            InvDescType::PasidIotlb => Self::PasidIotlb {
                granularity: PasidIotlbGranularity::from_bits(g)
                    .ok_or_else(|| reserved_value("G", g))?,
                did,
                pasid: pasid_field(q0),
                addr: q1 & ADDR_MASK,
                ih: bit(q1, 6),
                am: field(q1, 0, 6) as u8,
            },
            InvDescType::PasidCache => Self::PasidCache {
                granularity: PasidCacheGranularity::from_bits(g)
                    .ok_or_else(|| reserved_value("G", g))?,
                did,
                pasid: pasid_field(q0),
            },
            InvDescType::PasidDevIotlb => Self::PasidDevIotlb {
                sid: SourceId::from_rid(field(q0, 16, 16) as u16),
                pfsid: pfsid_field(q0),
                pasid: pasid_field(q0),
                max_invs_pend: field(q0, 4, 5) as u8,
                addr: q1 & ADDR_MASK,
                size: bit(q1, 11),
                global: bit(q1, 0),
            },
            InvDescType::PageGroupResponse => {
                let rc = field(q0, 12, 4);
                Self::PageGroupResponse {
                    rid: SourceId::from_rid(field(q0, 16, 16) as u16),
                    pasid_present: bit(q0, 4),
                    pasid: pasid_field(q0),
                    private_data_present: bit(q0, 5),
                    response: ResponseCode::from_bits(rc)
                        .ok_or_else(|| reserved_value("response code", rc))?,
                    last_page_in_group: bit(q1, 2),
                    prg_index: field(q1, 3, 9) as u16,
                    private_data: [q2, q3],
                }
            }
        })
    }

    /// Encodes the descriptor for the invalidation queue.
    pub fn encode(&self) -> Result<[u64; 4], InvDescError> {
        let kind = self.desc_type();
        let t = type_bits(kind);
        let flag = |b: bool, n: u32| (b as u64) << n;
        let did_bits = |did: DomainId| (did.0 as u64) << 16;
        let pasid_bits = |pasid: Pasid| (pasid.raw() as u64) << 32;
        Ok(match *self {
            Self::ContextCache {
                granularity,
                did,
                sid,
                fm,
            } => [
                t | granularity.raw() << 4
                    | did_bits(did)
                    | (sid.rid() as u64) << 32
                    | fits(kind, "FM", fm as u64, 2)? << 48,
                0,
                0,
                0,
            ],
            Self::Iotlb {
                granularity,
                dr,
                dw,
                did,
                addr,
                ih,
                am,
            } => [
                t | granularity.raw() << 4 | flag(dw, 6) | flag(dr, 7) | did_bits(did),
                aligned(kind, "ADDR", addr, !ADDR_MASK)?
                    | flag(ih, 6)
                    | fits(kind, "AM", am as u64, 6)?,
                0,
                0,
            ],
            Self::DevIotlb {
                sid,
                pfsid,
                max_invs_pend,
                addr,
                size,
            } => [
                t | pfsid_bits(pfsid)
                    | fits(kind, "MIP", max_invs_pend as u64, 5)? << 16
                    | (sid.rid() as u64) << 32,
                aligned(kind, "ADDR", addr, !ADDR_MASK)? | flag(size, 0),
                0,
                0,
            ],
            Self::InterruptEntryCache {
                granularity,
                index_mask,
                index,
            } => [
                t | granularity.raw() << 4
                    | fits(kind, "IM", index_mask as u64, 5)? << 27
                    | (index as u64) << 32,
                0,
                0,
                0,
            ],
            Self::InvWait {
                sw,
                interrupt,
                fence,
                pd,
                status_data,
                status_addr,
            } => [
                t | flag(interrupt, 4)
                    | flag(sw, 5)
                    | flag(fence, 6)
                    | flag(pd, 7)
                    | (status_data as u64) << 32,
                aligned(kind, "status address", status_addr, 0x3)?,
                0,
                0,
            ],
            Self::PasidCache {
                granularity,
                did,
                pasid,
            } => [
                t | granularity.raw() << 4 | did_bits(did) | pasid_bits(pasid),
                0,
                0,
                0,
            ],
            Self::PasidIotlb {
                granularity,
                did,
                pasid,
                addr,
                ih,
                am,
            } => [
                t | granularity.raw() << 4 | did_bits(did) | pasid_bits(pasid),
                aligned(kind, "ADDR", addr, !ADDR_MASK)?
                    | flag(ih, 6)
                    | fits(kind, "AM", am as u64, 6)?,
                0,
                0,
            ],
            Self::PasidDevIotlb {
                sid,
                pfsid,
                pasid,
                max_invs_pend,
                addr,
                size,
                global,
            } => [
                t | fits(kind, "MIP", max_invs_pend as u64, 5)? << 4
                    | pfsid_bits(pfsid)
                    | (sid.rid() as u64) << 16
                    | pasid_bits(pasid),
                aligned(kind, "ADDR", addr, !ADDR_MASK)? | flag(size, 11) | flag(global, 0),
                0,
                0,
            ],
            Self::PageGroupResponse {
                rid,
                pasid_present,
                pasid,
                private_data_present,
                response,
                last_page_in_group,
                prg_index,
                private_data,
            } => [
                t | flag(pasid_present, 4)
                    | flag(private_data_present, 5)
                    | response.raw() << 12
                    | (rid.rid() as u64) << 16
                    | pasid_bits(pasid),
                flag(last_page_in_group, 2) | fits(kind, "PRGI", prg_index as u64, 9)? << 3,
                private_data[0],
                private_data[1],
            ],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn response_codes_round_trip() {
        // The PCIe PRG Response Message codes; 0x2 is reserved.
        for code in [
            ResponseCode::Success,
            ResponseCode::InvalidRequest,
            ResponseCode::ResponseFailure,
        ] {
            assert_eq!(ResponseCode::from_bits(code.raw()), Some(code));
        }
        assert_eq!(ResponseCode::from_bits(0x2), None);
    }

    #[test]
    fn the_global_flush_is_context_then_pasid_cache_then_iotlb() {
        let [cc, pc, iotlb] = InvDesc::global_flush(true, false);
        // Type codes 1, 7, 2 with the global granularity; the IOTLB keeps the drain hints.
        assert_eq!(cc.encode().unwrap()[0], 0x1 | 1 << 4);
        assert_eq!(pc.encode().unwrap()[0], 0x7 | 3 << 4);
        assert_eq!(iotlb.encode().unwrap()[0], 0x2 | 1 << 4 | 1 << 7);
    }

    fn sid(rid: u16) -> SourceId {
        SourceId::from_rid(rid)
    }

    #[test]
    fn a_device_selective_context_invalidation_ignores_the_function_bits_fm_names() {
        use ContextCacheGranularity::*;
        // 00:03.5 against every function of device 3 and one function of device 4.
        let named = SourceId::new(0, 3, 5).unwrap();
        let covered = |fm| {
            (0..8)
                .filter(|&f| DeviceSelective.covers(named, fm, SourceId::new(0, 3, f).unwrap()))
                .collect::<Vec<_>>()
        };
        assert_eq!(covered(0), [5]);
        assert_eq!(covered(1), [1, 5]);
        assert_eq!(covered(2), [1, 3, 5, 7]);
        assert_eq!(covered(3), (0..8).collect::<Vec<_>>());
        // Only the two FM bits count; the bus and device always do.
        assert_eq!(covered(3 | 4), covered(3));
        let other = SourceId::new(0, 4, 5).unwrap();
        assert!(!DeviceSelective.covers(named, 3, other));
        assert!(!DeviceSelective.covers(named, 3, SourceId::new(1, 3, 5).unwrap()));
        // Scalable-mode context entries have no domain id: domain-selective is global.
        assert!(DomainSelective.covers(named, 0, other));
        assert!(Global.covers(named, 0, other));
    }

    fn pasid(raw: u32) -> Pasid {
        Pasid::new(raw).unwrap()
    }

    /// Encodes, compares with the hand-computed quadwords, and decodes back.
    fn check(desc: InvDesc, expected: [u64; 4]) {
        assert_eq!(desc.encode().unwrap(), expected, "{desc:?}");
        assert_eq!(InvDesc::decode(expected).unwrap(), desc);
    }

    #[test]
    fn context_cache_layout() {
        check(
            InvDesc::ContextCache {
                granularity: ContextCacheGranularity::DeviceSelective,
                did: DomainId(0x1234),
                sid: sid(0x0a10),
                fm: 2,
            },
            [0x0002_0a10_1234_0031, 0, 0, 0],
        );
        check(
            InvDesc::ContextCache {
                granularity: ContextCacheGranularity::Global,
                did: DomainId(0),
                sid: sid(0),
                fm: 0,
            },
            [0x11, 0, 0, 0],
        );
    }

    #[test]
    fn iotlb_layout() {
        check(
            InvDesc::Iotlb {
                granularity: IotlbGranularity::PageSelective,
                dr: true,
                dw: true,
                did: DomainId(5),
                addr: 0x7fff_f000,
                ih: true,
                am: 3,
            },
            [0x0000_0000_0005_00f2, 0x7fff_f043, 0, 0],
        );
        check(
            InvDesc::Iotlb {
                granularity: IotlbGranularity::DomainSelective,
                dr: false,
                dw: false,
                did: DomainId(0xffff),
                addr: 0,
                ih: false,
                am: 0,
            },
            [0xffff_0022, 0, 0, 0],
        );
    }

    #[test]
    fn dev_iotlb_layout() {
        check(
            InvDesc::DevIotlb {
                sid: sid(0x0300),
                pfsid: sid(0xabcd),
                max_invs_pend: 0x1f,
                addr: 0x1234_5000,
                size: true,
            },
            [0xabc0_0300_001f_d003, 0x1234_5001, 0, 0],
        );
    }

    #[test]
    fn interrupt_entry_cache_layout() {
        check(
            InvDesc::InterruptEntryCache {
                granularity: IecGranularity::IndexSelective,
                index_mask: 3,
                index: 0x40,
            },
            [0x0000_0040_1800_0014, 0, 0, 0],
        );
    }

    #[test]
    fn inv_wait_layout() {
        check(
            InvDesc::InvWait {
                sw: true,
                interrupt: true,
                fence: true,
                pd: false,
                status_data: 0xdead_beef,
                status_addr: 0x1000_0044,
            },
            [0xdead_beef_0000_0075, 0x1000_0044, 0, 0],
        );
        check(
            InvDesc::InvWait {
                sw: false,
                interrupt: false,
                fence: false,
                pd: true,
                status_data: 0,
                status_addr: 0,
            },
            [0x85, 0, 0, 0],
        );
    }

    #[test]
    fn pasid_cache_layout() {
        check(
            InvDesc::PasidCache {
                granularity: PasidCacheGranularity::PasidSelective,
                did: DomainId(7),
                pasid: pasid(0x12345),
            },
            [0x0001_2345_0007_0017, 0, 0, 0],
        );
        check(
            InvDesc::PasidCache {
                granularity: PasidCacheGranularity::Global,
                did: DomainId(0),
                pasid: pasid(0),
            },
            [0x37, 0, 0, 0],
        );
    }

    #[test]
    fn pasid_iotlb_layout() {
        check(
            InvDesc::PasidIotlb {
                granularity: PasidIotlbGranularity::PageSelectiveWithinPasid,
                did: DomainId(0x10),
                pasid: pasid(0xf_ffff),
                addr: 0x7f00_0020_0000,
                ih: false,
                am: 9,
            },
            [0x000f_ffff_0010_0036, 0x0000_7f00_0020_0009, 0, 0],
        );
        check(
            InvDesc::PasidIotlb {
                granularity: PasidIotlbGranularity::PasidSelective,
                did: DomainId(1),
                pasid: pasid(2),
                addr: 0,
                ih: false,
                am: 0,
            },
            [0x0000_0002_0001_0026, 0, 0, 0],
        );
    }

    #[test]
    fn pasid_dev_iotlb_layout() {
        check(
            InvDesc::PasidDevIotlb {
                sid: sid(0x0100),
                pfsid: sid(0x0100),
                pasid: pasid(5),
                max_invs_pend: 0,
                addr: 0x4000_0000,
                size: true,
                global: true,
            },
            [0x0100_0005_0100_0008, 0x4000_0801, 0, 0],
        );
        check(
            InvDesc::PasidDevIotlb {
                sid: sid(0xffff),
                pfsid: sid(0x000f),
                pasid: pasid(0),
                max_invs_pend: 0x1f,
                addr: 0,
                size: false,
                global: false,
            },
            [0x0000_0000_ffff_f1f8, 0, 0, 0],
        );
    }

    #[test]
    fn page_group_response_layout() {
        check(
            InvDesc::PageGroupResponse {
                rid: sid(0x0108),
                pasid_present: true,
                pasid: pasid(0x42),
                private_data_present: true,
                response: ResponseCode::InvalidRequest,
                last_page_in_group: true,
                prg_index: 0x1ff,
                private_data: [1, 2],
            },
            [0x0000_0042_0108_1039, 0xffc, 1, 2],
        );
        check(
            InvDesc::PageGroupResponse {
                rid: sid(1),
                pasid_present: false,
                pasid: pasid(0),
                private_data_present: false,
                response: ResponseCode::ResponseFailure,
                last_page_in_group: false,
                prg_index: 0,
                private_data: [0, 0],
            },
            [0x0001_f009, 0, 0, 0],
        );
    }

    #[test]
    fn unknown_types_are_rejected() {
        assert_eq!(InvDesc::decode([0; 4]), Err(InvDescError::UnknownType(0)));
        assert_eq!(
            InvDesc::decode([0xa, 0, 0, 0]),
            Err(InvDescError::UnknownType(10))
        );
        // Type 0x11: low bits 1 (context cache) with a high type bit set.
        assert_eq!(
            InvDesc::decode([0x211, 0, 0, 0]),
            Err(InvDescError::UnknownType(0x11))
        );
        assert_eq!(
            InvDesc::decode([0xe00 | 0xf, 0, 0, 0]),
            Err(InvDescError::UnknownType(0x7f))
        );
    }

    #[test]
    fn reserved_bits_are_rejected() {
        let cases: [([u64; 4], InvDescType, usize, u64); 8] = [
            (
                [0x11 | 1 << 6, 0, 0, 0],
                InvDescType::ContextCache,
                0,
                1 << 6,
            ),
            ([0x11, 1, 0, 0], InvDescType::ContextCache, 1, 1),
            ([0x12 | 1 << 40, 0, 0, 0], InvDescType::Iotlb, 0, 1 << 40),
            ([0x32, 1 << 7, 0, 0], InvDescType::Iotlb, 1, 1 << 7),
            ([0x3 | 1 << 50, 0, 0, 0], InvDescType::DevIotlb, 0, 1 << 50),
            ([0x5, 0x1000_0001, 0, 0], InvDescType::InvWait, 1, 1),
            ([0x26, 0, 0, 1 << 63], InvDescType::PasidIotlb, 3, 1 << 63),
            ([0x8, 1 << 5, 0, 0], InvDescType::PasidDevIotlb, 1, 1 << 5),
        ];
        for (raw, kind, qword, bits) in cases {
            assert_eq!(
                InvDesc::decode(raw),
                Err(InvDescError::Reserved { kind, qword, bits }),
                "{raw:x?}"
            );
        }
        // Bits 255:128 carry private data in a page group response, not reserved bits.
        assert!(InvDesc::decode([0x9, 0, u64::MAX, u64::MAX]).is_ok());
        assert_eq!(
            InvDesc::decode([0x9, 1 << 12, 0, 0]),
            Err(InvDescError::Reserved {
                kind: InvDescType::PageGroupResponse,
                qword: 1,
                bits: 1 << 12
            })
        );
    }

    #[test]
    fn reserved_granularities_are_rejected() {
        let cases: [([u64; 4], InvDescType, &str, u64); 5] = [
            ([0x01, 0, 0, 0], InvDescType::ContextCache, "G", 0),
            ([0x02, 0, 0, 0], InvDescType::Iotlb, "G", 0),
            ([0x06, 0, 0, 0], InvDescType::PasidIotlb, "G", 0),
            ([0x16, 0, 0, 0], InvDescType::PasidIotlb, "G", 1),
            ([0x27, 0, 0, 0], InvDescType::PasidCache, "G", 2),
        ];
        for (raw, kind, field, value) in cases {
            assert_eq!(
                InvDesc::decode(raw),
                Err(InvDescError::ReservedValue { kind, field, value })
            );
        }
        assert_eq!(
            InvDesc::decode([0x9 | 2 << 12, 0, 0, 0]),
            Err(InvDescError::ReservedValue {
                kind: InvDescType::PageGroupResponse,
                field: "response code",
                value: 2
            })
        );
    }

    #[test]
    fn encode_rejects_fields_that_do_not_fit() {
        let iotlb = |addr, am| InvDesc::Iotlb {
            granularity: IotlbGranularity::PageSelective,
            dr: false,
            dw: false,
            did: DomainId(1),
            addr,
            ih: false,
            am,
        };
        assert_eq!(
            iotlb(0x1000, 64).encode(),
            Err(InvDescError::FieldRange {
                kind: InvDescType::Iotlb,
                field: "AM",
                value: 64
            })
        );
        assert_eq!(
            iotlb(0x1800, 0).encode(),
            Err(InvDescError::FieldRange {
                kind: InvDescType::Iotlb,
                field: "ADDR",
                value: 0x1800
            })
        );
        let wait = InvDesc::InvWait {
            sw: true,
            interrupt: false,
            fence: false,
            pd: false,
            status_data: 1,
            status_addr: 0x1002,
        };
        assert!(matches!(
            wait.encode(),
            Err(InvDescError::FieldRange {
                field: "status address",
                ..
            })
        ));
        let prg = InvDesc::PageGroupResponse {
            rid: sid(1),
            pasid_present: false,
            pasid: pasid(0),
            private_data_present: false,
            response: ResponseCode::Success,
            last_page_in_group: true,
            prg_index: 512,
            private_data: [0, 0],
        };
        assert!(matches!(
            prg.encode(),
            Err(InvDescError::FieldRange { field: "PRGI", .. })
        ));
    }

    #[test]
    fn address_mask_ranges() {
        let r = AddrRange::from_address_mask(0x12_3456, 0);
        assert_eq!((r.start, r.last), (0x12_3000, 0x12_3fff));
        // AM = 9: 2 MiB, the low nine page-number bits are ignored.
        let r = AddrRange::from_address_mask(0x7f00_0023_4000, 9);
        assert_eq!((r.start, r.last), (0x7f00_0020_0000, 0x7f00_003f_ffff));
        assert!(r.contains(0x7f00_0020_0000) && r.contains(0x7f00_003f_ffff));
        assert!(!r.contains(0x7f00_0040_0000) && !r.contains(0x7f00_001f_ffff));
        assert!(r.overlaps(0x7f00_003f_f000, 0x7f00_0040_0fff));
        assert!(!r.overlaps(0x7f00_0040_0000, 0x7f00_0040_0fff));
        // Masks reaching past bit 63 cover everything.
        let all = AddrRange::from_address_mask(0x1234_5000, 63);
        assert_eq!((all.start, all.last), (0, u64::MAX));
        let top = AddrRange::from_address_mask(u64::MAX, 51);
        assert_eq!((top.start, top.last), (0x8000_0000_0000_0000, u64::MAX));
    }

    #[test]
    fn ats_size_ranges() {
        let one = AddrRange::from_ats_size(0x5000, false);
        assert_eq!((one.start, one.last), (0x5000, 0x5fff));
        // Bit 12 clear: 8 KiB.
        let r = AddrRange::from_ats_size(0x4000, true);
        assert_eq!((r.start, r.last), (0x4000, 0x5fff));
        // Bits 13:12 = 01: 16 KiB.
        let r = AddrRange::from_ats_size(0x1000, true);
        assert_eq!((r.start, r.last), (0, 0x3fff));
        // Linux's 2 MiB flush: address | (2 MiB / 2 - 1).
        let r = AddrRange::from_ats_size(0x4000_0000 | 0xf_ffff, true);
        assert_eq!((r.start, r.last), (0x4000_0000, 0x401f_ffff));
        // All address bits set but bit 63: the whole space.
        let r = AddrRange::from_ats_size(0x7fff_ffff_ffff_f000, true);
        assert_eq!((r.start, r.last), (0, u64::MAX));
        let r = AddrRange::from_ats_size(ADDR_MASK, true);
        assert_eq!((r.start, r.last), (0, u64::MAX));
        let desc = InvDesc::PasidDevIotlb {
            sid: sid(1),
            pfsid: sid(1),
            pasid: pasid(1),
            max_invs_pend: 0,
            addr: 0x4000,
            size: true,
            global: false,
        };
        assert_eq!(
            desc.range(),
            Some(AddrRange {
                start: 0x4000,
                last: 0x5fff
            })
        );
        assert_eq!(
            InvDesc::PasidCache {
                granularity: PasidCacheGranularity::Global,
                did: DomainId(0),
                pasid: pasid(0)
            }
            .range(),
            None
        );
    }

    fn arb_desc() -> impl Strategy<Value = InvDesc> {
        let did = any::<u16>().prop_map(DomainId);
        let sid = any::<u16>().prop_map(SourceId::from_rid);
        let pasid = (0u32..=Pasid::MAX.raw()).prop_map(|p| Pasid::new(p).unwrap());
        let page = any::<u64>().prop_map(|a| a & ADDR_MASK);
        prop_oneof![
            (
                prop_oneof![
                    Just(ContextCacheGranularity::Global),
                    Just(ContextCacheGranularity::DomainSelective),
                    Just(ContextCacheGranularity::DeviceSelective)
                ],
                did.clone(),
                sid.clone(),
                0u8..4
            )
                .prop_map(|(granularity, did, sid, fm)| InvDesc::ContextCache {
                    granularity,
                    did,
                    sid,
                    fm
                }),
            (
                prop_oneof![
                    Just(IotlbGranularity::Global),
                    Just(IotlbGranularity::DomainSelective),
                    Just(IotlbGranularity::PageSelective)
                ],
                any::<(bool, bool, bool)>(),
                did.clone(),
                page.clone(),
                0u8..64
            )
                .prop_map(|(granularity, (dr, dw, ih), did, addr, am)| {
                    InvDesc::Iotlb {
                        granularity,
                        dr,
                        dw,
                        did,
                        addr,
                        ih,
                        am,
                    }
                }),
            (
                sid.clone(),
                sid.clone(),
                0u8..32,
                page.clone(),
                any::<bool>()
            )
                .prop_map(|(sid, pfsid, max_invs_pend, addr, size)| {
                    InvDesc::DevIotlb {
                        sid,
                        pfsid,
                        max_invs_pend,
                        addr,
                        size,
                    }
                }),
            (any::<bool>(), 0u8..32, any::<u16>()).prop_map(|(sel, index_mask, index)| {
                InvDesc::InterruptEntryCache {
                    granularity: if sel {
                        IecGranularity::IndexSelective
                    } else {
                        IecGranularity::Global
                    },
                    index_mask,
                    index,
                }
            }),
            (
                any::<(bool, bool, bool, bool)>(),
                any::<u32>(),
                any::<u64>()
            )
                .prop_map(|((sw, interrupt, fence, pd), status_data, a)| {
                    InvDesc::InvWait {
                        sw,
                        interrupt,
                        fence,
                        pd,
                        status_data,
                        status_addr: a & !3,
                    }
                }),
            (
                prop_oneof![
                    Just(PasidCacheGranularity::DomainSelective),
                    Just(PasidCacheGranularity::PasidSelective),
                    Just(PasidCacheGranularity::Global)
                ],
                did.clone(),
                pasid.clone()
            )
                .prop_map(|(granularity, did, pasid)| InvDesc::PasidCache {
                    granularity,
                    did,
                    pasid
                }),
            (
                prop_oneof![
                    Just(PasidIotlbGranularity::PasidSelective),
                    Just(PasidIotlbGranularity::PageSelectiveWithinPasid)
                ],
                did,
                pasid.clone(),
                page.clone(),
                any::<bool>(),
                0u8..64
            )
                .prop_map(|(granularity, did, pasid, addr, ih, am)| {
                    InvDesc::PasidIotlb {
                        granularity,
                        did,
                        pasid,
                        addr,
                        ih,
                        am,
                    }
                }),
            (
                sid.clone(),
                sid.clone(),
                pasid.clone(),
                0u8..32,
                page,
                any::<(bool, bool)>()
            )
                .prop_map(
                    |(sid, pfsid, pasid, max_invs_pend, addr, (size, global))| {
                        InvDesc::PasidDevIotlb {
                            sid,
                            pfsid,
                            pasid,
                            max_invs_pend,
                            addr,
                            size,
                            global,
                        }
                    }
                ),
            (
                sid,
                any::<(bool, bool, bool)>(),
                pasid,
                prop_oneof![
                    Just(ResponseCode::Success),
                    Just(ResponseCode::InvalidRequest),
                    Just(ResponseCode::ResponseFailure)
                ],
                0u16..512,
                any::<[u64; 2]>()
            )
                .prop_map(
                    |(rid, (pp, pdp, lpig), pasid, response, prg_index, private_data)| {
                        InvDesc::PageGroupResponse {
                            rid,
                            pasid_present: pp,
                            pasid,
                            private_data_present: pdp,
                            response,
                            last_page_in_group: lpig,
                            prg_index,
                            private_data,
                        }
                    }
                ),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn encode_then_decode_round_trips(desc in arb_desc()) {
            let raw = desc.encode().unwrap();
            prop_assert_eq!((raw[0] & 0xf) | ((raw[0] >> 5) & 0x70), desc.desc_type().code() as u64);
            prop_assert_eq!(InvDesc::decode(raw).unwrap(), desc);
        }

        /// Decoding never drops a bit: whatever it accepts encodes back to the same words,
        /// and one reserved bit is enough for rejection.
        #[test]
        fn decode_keeps_every_bit(
            raw in any::<[u64; 4]>(),
            code in 1u8..10,
            inject in proptest::option::weighted(0.3, (0usize..4, 0u32..64)),
        ) {
            let kind = InvDescType::from_code(code).unwrap();
            let reserved = kind.reserved();
            let mut words = raw;
            for (w, r) in words.iter_mut().zip(reserved) {
                *w &= !r;
            }
            words[0] = (words[0] & !0xe0f) | code as u64;
            let injected = inject.filter(|&(q, b)| reserved[q] & (1 << b) != 0);
            if let Some((q, b)) = injected {
                words[q] |= 1 << b;
            }
            match (InvDesc::decode(words), injected) {
                (Ok(desc), None) => prop_assert_eq!(desc.encode().unwrap(), words),
                (Err(InvDescError::Reserved { kind: k, qword, bits }), Some((q, b))) => {
                    prop_assert_eq!((k, qword, bits), (kind, q, 1 << b));
                }
                (Err(InvDescError::ReservedValue { kind: k, .. }), _) => prop_assert_eq!(k, kind),
                (other, injected) => prop_assert!(false, "{:?} with {:?}", other, injected),
            }
        }
    }
}
