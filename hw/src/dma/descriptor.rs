//! Work descriptors and completion records of the DMA engine.
//!
//! The layout follows Intel DSA's (64-byte descriptor, 32-byte completion record; Linux
//! `include/uapi/linux/idxd.h` gives the same field positions and codes), reduced to the
//! operations this model implements. Two vsva additions use bits DSA reserves: descriptor
//! bit 30 (PASID valid, where DSA takes it from the submission) and completion-record byte 2
//! (the VT-d fault reason code of a translation failure).

use vsva_vtd::addr::Pasid;

/// Size of a descriptor and of a portal write.
pub const DESCRIPTOR_SIZE: usize = 64;
/// Size of a completion record.
pub const COMPLETION_RECORD_SIZE: usize = 32;
/// Required alignment of a completion record address.
pub const COMPLETION_RECORD_ALIGN: u64 = 32;

/// Descriptor flag: block on fault (issue a page request and wait, rather than complete
/// partially, when a translation fault is recoverable).
pub const FLAG_BOF: u32 = 1 << 1;
/// Descriptor flag: completion record address valid.
pub const FLAG_CRAV: u32 = 1 << 2;
/// Descriptor flag: request completion record (also on success; without it a record is
/// written only for an error).
pub const FLAG_RCR: u32 = 1 << 3;
/// The flags this device implements; any other flag makes the descriptor invalid.
pub const SUPPORTED_FLAGS: u32 = FLAG_BOF | FLAG_CRAV | FLAG_RCR;

const DW0_PASID_MASK: u32 = (1 << Pasid::BITS) - 1;
const DW0_PASID_VALID: u32 = 1 << 30;
const DW0_PRIV: u32 = 1 << 31;
const DW0_RESERVED: u32 = !(DW0_PASID_MASK | DW0_PASID_VALID | DW0_PRIV);
const DW1_FLAGS_MASK: u32 = 0x00ff_ffff;

/// The descriptor as it sits in memory or on the portal, little-endian fields.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawDescriptor {
    /// Bits 19:0 PASID, 29:20 reserved, 30 PASID valid, 31 privileged.
    pub pasid_priv: u32,
    /// Bits 23:0 flags, 31:24 opcode.
    pub flags_opcode: u32,
    /// Completion record address (bytes 15:8); used when the CRAV flag is set.
    pub completion_addr: u64,
    /// Source (memmove), first source (compare), pattern (fill).
    pub src: u64,
    /// Destination (memmove, fill), second source (compare).
    pub dst: u64,
    /// Transfer size in bytes (bytes 35:32).
    pub xfer_size: u32,
    /// Interrupt handle in DSA; reserved here (no completion interrupts).
    pub int_handle: u16,
    /// Reserved (bytes 39:38).
    pub rsvd: u16,
    /// Operation-specific bytes; all reserved for the implemented operations.
    pub op_specific: [u8; 24],
}

const _: () = assert!(std::mem::size_of::<RawDescriptor>() == DESCRIPTOR_SIZE);

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

impl RawDescriptor {
    /// The descriptor in 64 bytes.
    pub fn from_bytes(b: &[u8; DESCRIPTOR_SIZE]) -> Self {
        let mut op_specific = [0u8; 24];
        op_specific.copy_from_slice(&b[40..64]);
        RawDescriptor {
            pasid_priv: le_u32(b, 0),
            flags_opcode: le_u32(b, 4),
            completion_addr: le_u64(b, 8),
            src: le_u64(b, 16),
            dst: le_u64(b, 24),
            xfer_size: le_u32(b, 32),
            int_handle: le_u16(b, 36),
            rsvd: le_u16(b, 38),
            op_specific,
        }
    }

    /// The 64 bytes of the descriptor.
    pub fn to_bytes(&self) -> [u8; DESCRIPTOR_SIZE] {
        let mut b = [0u8; DESCRIPTOR_SIZE];
        b[0..4].copy_from_slice(&self.pasid_priv.to_le_bytes());
        b[4..8].copy_from_slice(&self.flags_opcode.to_le_bytes());
        b[8..16].copy_from_slice(&self.completion_addr.to_le_bytes());
        b[16..24].copy_from_slice(&self.src.to_le_bytes());
        b[24..32].copy_from_slice(&self.dst.to_le_bytes());
        b[32..36].copy_from_slice(&self.xfer_size.to_le_bytes());
        b[36..38].copy_from_slice(&self.int_handle.to_le_bytes());
        b[38..40].copy_from_slice(&self.rsvd.to_le_bytes());
        b[40..64].copy_from_slice(&self.op_specific);
        b
    }

    /// The opcode byte.
    pub const fn opcode(&self) -> u8 {
        (self.flags_opcode >> 24) as u8
    }

    /// The 24 flag bits.
    pub const fn flags(&self) -> u32 {
        self.flags_opcode & DW1_FLAGS_MASK
    }

    /// The PASID the descriptor names, when its PASID-valid bit is set.
    pub fn pasid(&self) -> Option<Pasid> {
        if self.pasid_priv & DW0_PASID_VALID == 0 {
            return None;
        }
        Some(Pasid::from_low_bits(self.pasid_priv.into()))
    }

    /// Whether the descriptor asks for privileged-mode accesses.
    pub const fn privileged(&self) -> bool {
        self.pasid_priv & DW0_PRIV != 0
    }
}

/// Opcodes (DSA numbering).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    /// No operation ([`Operation::Nop`]).
    Nop = 0x00,
    /// Drain ([`Operation::Drain`]).
    Drain = 0x02,
    /// Memory move ([`Operation::Memmove`]).
    Memmove = 0x03,
    /// Memory fill ([`Operation::Fill`]).
    Fill = 0x04,
    /// Compare ([`Operation::Compare`]).
    Compare = 0x05,
}

impl Opcode {
    /// The operation for an opcode byte this device implements.
    pub const fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            0x00 => Some(Opcode::Nop),
            0x02 => Some(Opcode::Drain),
            0x03 => Some(Opcode::Memmove),
            0x04 => Some(Opcode::Fill),
            0x05 => Some(Opcode::Compare),
            _ => None,
        }
    }
}

/// What a descriptor asks the engine to do; addresses are device-visible (GVA with a
/// PASID, IOVA without).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operation {
    /// Nothing; completes in order with the descriptors before it on the same engine.
    Nop,
    /// Completes once every descriptor submitted before it has completed.
    Drain,
    /// Copies `size` bytes, with `memmove` semantics for overlapping ranges.
    Memmove {
        /// Source address.
        src: u64,
        /// Destination address.
        dst: u64,
        /// Bytes to copy.
        size: u32,
    },
    /// Writes `size` bytes of the 8-byte `pattern` (little-endian, repeated from `dst`).
    Fill {
        /// The 8-byte pattern (carried in the source address field).
        pattern: u64,
        /// Destination address.
        dst: u64,
        /// Bytes to write.
        size: u32,
    },
    /// Compares `size` bytes; the record's result is 0 when equal, 1 when not.
    Compare {
        /// First source address.
        src1: u64,
        /// Second source address (carried in the destination address field).
        src2: u64,
        /// Bytes to compare.
        size: u32,
    },
}

impl Operation {
    /// The opcode.
    pub const fn opcode(&self) -> Opcode {
        match self {
            Operation::Nop => Opcode::Nop,
            Operation::Drain => Opcode::Drain,
            Operation::Memmove { .. } => Opcode::Memmove,
            Operation::Fill { .. } => Opcode::Fill,
            Operation::Compare { .. } => Opcode::Compare,
        }
    }

    /// The transfer size in bytes (0 for Nop and Drain).
    pub const fn size(&self) -> u32 {
        match *self {
            Operation::Nop | Operation::Drain => 0,
            Operation::Memmove { size, .. }
            | Operation::Fill { size, .. }
            | Operation::Compare { size, .. } => size,
        }
    }

    fn fields(&self) -> (u64, u64) {
        match *self {
            Operation::Nop | Operation::Drain => (0, 0),
            Operation::Memmove { src, dst, .. } => (src, dst),
            Operation::Fill { pattern, dst, .. } => (pattern, dst),
            Operation::Compare { src1, src2, .. } => (src1, src2),
        }
    }
}

/// Where and when the device writes the completion record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CompletionRequest {
    /// No record; errors go to the software error register.
    None,
    /// A record at this (32-byte aligned, device-visible) address only on error (CRAV).
    OnError(u64),
    /// A record at this address always (CRAV and RCR).
    Always(u64),
}

impl CompletionRequest {
    /// The record address, if any.
    pub const fn addr(&self) -> Option<u64> {
        match *self {
            CompletionRequest::None => None,
            CompletionRequest::OnError(a) | CompletionRequest::Always(a) => Some(a),
        }
    }
}

/// A valid descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Descriptor {
    /// The address space of every access (`None`: requests without PASID).
    pub pasid: Option<Pasid>,
    /// Accesses are privileged-mode (supervisor) requests.
    pub privileged: bool,
    /// On a recoverable fault, issue a page request and wait instead of completing
    /// partially.
    pub block_on_fault: bool,
    /// Whether and where a completion record is written.
    pub completion: CompletionRequest,
    /// The operation and its addresses.
    pub op: Operation,
}

/// Why a descriptor is invalid: the status to report and, for flags, which bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid descriptor: {status:?} (flags {invalid_flags:#x})")]
pub struct DescriptorError {
    /// The status the device reports for the descriptor.
    pub status: CompletionStatus,
    /// For [`CompletionStatus::InvalidFlags`]: the offending flag bits; 0 otherwise.
    pub invalid_flags: u32,
}

impl DescriptorError {
    const fn new(status: CompletionStatus, invalid_flags: u32) -> Self {
        DescriptorError {
            status,
            invalid_flags,
        }
    }
}

impl Descriptor {
    /// The raw form.
    pub fn to_raw(&self) -> RawDescriptor {
        let mut pasid_priv = match self.pasid {
            Some(p) => p.raw() | DW0_PASID_VALID,
            None => 0,
        };
        if self.privileged {
            pasid_priv |= DW0_PRIV;
        }
        let (completion_addr, mut flags) = match self.completion {
            CompletionRequest::None => (0, 0),
            CompletionRequest::OnError(a) => (a, FLAG_CRAV),
            CompletionRequest::Always(a) => (a, FLAG_CRAV | FLAG_RCR),
        };
        if self.block_on_fault {
            flags |= FLAG_BOF;
        }
        let (src, dst) = self.op.fields();
        RawDescriptor {
            pasid_priv,
            flags_opcode: flags | (self.op.opcode() as u32) << 24,
            completion_addr,
            src,
            dst,
            xfer_size: self.op.size(),
            ..RawDescriptor::default()
        }
    }

    /// The 64 bytes to write to the portal.
    pub fn encode(&self) -> [u8; DESCRIPTOR_SIZE] {
        self.to_raw().to_bytes()
    }

    /// Validates a raw descriptor, in the order DSA checks: opcode, flags, reserved fields,
    /// completion record address, transfer size. Fields an operation does not use must be
    /// zero, so decoding and encoding are inverse.
    pub fn decode(raw: &RawDescriptor) -> Result<Descriptor, DescriptorError> {
        let opcode = Opcode::from_raw(raw.opcode())
            .ok_or(DescriptorError::new(CompletionStatus::BadOpcode, 0))?;
        let flags = raw.flags();
        let unsupported = flags & !SUPPORTED_FLAGS;
        if unsupported != 0 {
            return Err(DescriptorError::new(
                CompletionStatus::InvalidFlags,
                unsupported,
            ));
        }
        let crav = flags & FLAG_CRAV != 0;
        if flags & FLAG_RCR != 0 && !crav {
            return Err(DescriptorError::new(
                CompletionStatus::InvalidFlags,
                FLAG_RCR,
            ));
        }
        let no_data = matches!(opcode, Opcode::Nop | Opcode::Drain);
        let pasid_valid = raw.pasid_priv & DW0_PASID_VALID != 0;
        if raw.pasid_priv & DW0_RESERVED != 0
            || (!pasid_valid && raw.pasid_priv & DW0_PASID_MASK != 0)
            || (!crav && raw.completion_addr != 0)
            || raw.int_handle != 0
            || raw.rsvd != 0
            || raw.op_specific != [0; 24]
            || (no_data && (raw.src != 0 || raw.dst != 0 || raw.xfer_size != 0))
        {
            return Err(DescriptorError::new(CompletionStatus::NonzeroReserved, 0));
        }
        if crav && raw.completion_addr % COMPLETION_RECORD_ALIGN != 0 {
            return Err(DescriptorError::new(
                CompletionStatus::CompletionAddrAlign,
                0,
            ));
        }
        let completion = match (crav, flags & FLAG_RCR != 0) {
            (false, _) => CompletionRequest::None,
            (true, false) => CompletionRequest::OnError(raw.completion_addr),
            (true, true) => CompletionRequest::Always(raw.completion_addr),
        };
        let size = raw.xfer_size;
        let in_range = |addr: u64| addr.checked_add(u64::from(size)).is_some();
        let (op, ranges_ok) = match opcode {
            Opcode::Nop => (Operation::Nop, true),
            Opcode::Drain => (Operation::Drain, true),
            Opcode::Memmove => (
                Operation::Memmove {
                    src: raw.src,
                    dst: raw.dst,
                    size,
                },
                in_range(raw.src) && in_range(raw.dst),
            ),
            Opcode::Fill => (
                Operation::Fill {
                    pattern: raw.src,
                    dst: raw.dst,
                    size,
                },
                in_range(raw.dst),
            ),
            Opcode::Compare => (
                Operation::Compare {
                    src1: raw.src,
                    src2: raw.dst,
                    size,
                },
                in_range(raw.src) && in_range(raw.dst),
            ),
        };
        if !no_data && (size == 0 || !ranges_ok) {
            return Err(DescriptorError::new(CompletionStatus::TransferSize, 0));
        }
        Ok(Descriptor {
            pasid: raw.pasid(),
            privileged: raw.privileged(),
            block_on_fault: flags & FLAG_BOF != 0,
            completion,
            op,
        })
    }
}

/// Completion status codes (DSA numbering, bits 6:0 of the status byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CompletionStatus {
    /// Not written yet: what software polls for.
    None = 0x00,
    /// The operation completed.
    Success = 0x01,
    /// A recoverable page fault the device did not resolve (no block-on-fault, PRI
    /// disabled or unavailable): partial completion.
    PageFault = 0x03,
    /// A page request was answered with Invalid Request or Response Failure.
    PageResponseError = 0x04,
    /// The opcode is not one this device implements.
    BadOpcode = 0x10,
    /// A flag is unsupported, or RCR is set without CRAV.
    InvalidFlags = 0x11,
    /// A reserved field, or a field the operation does not use, is not zero.
    NonzeroReserved = 0x12,
    /// Transfer size zero, above the device maximum, or running past the address space.
    TransferSize = 0x13,
    /// A fault on the completion record address (software error register only).
    CompletionAddrTranslation = 0x1a,
    /// Completion record address not 32-byte aligned (software error register only).
    CompletionAddrAlign = 0x1b,
    /// Privileged descriptor while privileged mode is not enabled, or PASID-valid set while
    /// PASID is not enabled.
    PrivilegeBad = 0x1d,
    /// A memory access got an error response: the HPA is not in host memory.
    AccessError = 0x20,
    /// A non-recoverable translation fault (the IOMMU recorded it): partial completion.
    TranslationFail = 0x22,
}

impl CompletionStatus {
    /// The status for bits 6:0 of a status byte, if it is one this device writes.
    pub const fn from_raw(raw: u8) -> Option<Self> {
        Some(match raw {
            0x00 => CompletionStatus::None,
            0x01 => CompletionStatus::Success,
            0x03 => CompletionStatus::PageFault,
            0x04 => CompletionStatus::PageResponseError,
            0x10 => CompletionStatus::BadOpcode,
            0x11 => CompletionStatus::InvalidFlags,
            0x12 => CompletionStatus::NonzeroReserved,
            0x13 => CompletionStatus::TransferSize,
            0x1a => CompletionStatus::CompletionAddrTranslation,
            0x1b => CompletionStatus::CompletionAddrAlign,
            0x1d => CompletionStatus::PrivilegeBad,
            0x20 => CompletionStatus::AccessError,
            0x22 => CompletionStatus::TranslationFail,
            _ => return None,
        })
    }

    /// Whether the status reports a fault at an address (`fault_addr` is meaningful).
    pub const fn is_fault(&self) -> bool {
        matches!(
            self,
            CompletionStatus::PageFault
                | CompletionStatus::PageResponseError
                | CompletionStatus::TranslationFail
                | CompletionStatus::AccessError
        )
    }
}

const STATUS_WRITE_FAULT: u8 = 0x80;
const STATUS_MASK: u8 = 0x7f;

/// A completion record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CompletionRecord {
    /// Completion status (status byte bits 6:0).
    pub status: CompletionStatus,
    /// For faults: the faulting access was a write (status bit 7).
    pub fault_write: bool,
    /// Compare: 0 equal, 1 different. Memmove: 1 when the copy ran from the top down
    /// (overlapping ranges), so that `bytes_completed` counts from the end.
    pub result: u8,
    /// For translation faults: the VT-d fault reason code (vsva addition, byte 2).
    pub fault_reason: u8,
    /// Bytes done before a fault; for a compare that differs, the offset of the first
    /// difference; the transfer size on success.
    pub bytes_completed: u32,
    /// The device address that faulted.
    pub fault_addr: u64,
    /// For `InvalidFlags`: the offending flag bits.
    pub invalid_flags: u32,
}

impl CompletionRecord {
    /// A record with `status` and everything else zero.
    pub const fn new(status: CompletionStatus) -> Self {
        CompletionRecord {
            status,
            fault_write: false,
            result: 0,
            fault_reason: 0,
            bytes_completed: 0,
            fault_addr: 0,
            invalid_flags: 0,
        }
    }

    /// The 32 bytes of the record.
    pub fn to_bytes(&self) -> [u8; COMPLETION_RECORD_SIZE] {
        let mut b = [0u8; COMPLETION_RECORD_SIZE];
        b[0] = self.status as u8
            | if self.fault_write {
                STATUS_WRITE_FAULT
            } else {
                0
            };
        b[1] = self.result;
        b[2] = self.fault_reason;
        b[4..8].copy_from_slice(&self.bytes_completed.to_le_bytes());
        b[8..16].copy_from_slice(&self.fault_addr.to_le_bytes());
        b[16..20].copy_from_slice(&self.invalid_flags.to_le_bytes());
        b
    }

    /// Decodes a record; `None` when the status byte holds a code this device never writes.
    pub fn from_bytes(b: &[u8; COMPLETION_RECORD_SIZE]) -> Option<Self> {
        Some(CompletionRecord {
            status: CompletionStatus::from_raw(b[0] & STATUS_MASK)?,
            fault_write: b[0] & STATUS_WRITE_FAULT != 0,
            result: b[1],
            fault_reason: b[2],
            bytes_completed: le_u32(b, 4),
            fault_addr: le_u64(b, 8),
            invalid_flags: le_u32(b, 16),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pasid(p: u32) -> Option<Pasid> {
        Some(Pasid::new(p).unwrap())
    }

    #[test]
    fn layout_matches_dsa_positions() {
        let d = Descriptor {
            pasid: pasid(0x12345),
            privileged: true,
            block_on_fault: true,
            completion: CompletionRequest::Always(0x7000_0040),
            op: Operation::Memmove {
                src: 0x1111_2222,
                dst: 0x3333_4444,
                size: 0x5000,
            },
        };
        let b = d.encode();
        assert_eq!(le_u32(&b, 0), 0x12345 | 1 << 30 | 1 << 31);
        assert_eq!(b[7], 0x03, "opcode in byte 7");
        assert_eq!(le_u32(&b, 4) & 0xff_ffff, FLAG_BOF | FLAG_CRAV | FLAG_RCR);
        assert_eq!(le_u64(&b, 8), 0x7000_0040);
        assert_eq!(le_u64(&b, 16), 0x1111_2222);
        assert_eq!(le_u64(&b, 24), 0x3333_4444);
        assert_eq!(le_u32(&b, 32), 0x5000);
        assert_eq!(Descriptor::decode(&RawDescriptor::from_bytes(&b)), Ok(d));
    }

    #[test]
    fn invalid_descriptors_get_dsa_status_codes() {
        let good = Descriptor {
            pasid: None,
            privileged: false,
            block_on_fault: false,
            completion: CompletionRequest::OnError(0x1000),
            op: Operation::Fill {
                pattern: 7,
                dst: 0x2000,
                size: 8,
            },
        }
        .to_raw();
        let check = |raw: RawDescriptor, status, flags| {
            assert_eq!(
                Descriptor::decode(&raw),
                Err(DescriptorError::new(status, flags)),
                "{raw:x?}"
            );
        };
        check(
            RawDescriptor {
                flags_opcode: (good.flags_opcode & DW1_FLAGS_MASK) | 0x01 << 24,
                ..good
            },
            CompletionStatus::BadOpcode,
            0,
        );
        check(
            RawDescriptor {
                flags_opcode: good.flags_opcode | 0x1,
                ..good
            },
            CompletionStatus::InvalidFlags,
            0x1,
        );
        check(
            RawDescriptor {
                flags_opcode: (good.flags_opcode & !FLAG_CRAV) | FLAG_RCR,
                ..good
            },
            CompletionStatus::InvalidFlags,
            FLAG_RCR,
        );
        check(
            RawDescriptor {
                pasid_priv: 1 << 20,
                ..good
            },
            CompletionStatus::NonzeroReserved,
            0,
        );
        check(
            RawDescriptor {
                op_specific: [
                    0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                ],
                ..good
            },
            CompletionStatus::NonzeroReserved,
            0,
        );
        check(
            RawDescriptor {
                completion_addr: 0x1010,
                ..good
            },
            CompletionStatus::CompletionAddrAlign,
            0,
        );
        check(
            RawDescriptor {
                xfer_size: 0,
                ..good
            },
            CompletionStatus::TransferSize,
            0,
        );
        check(
            RawDescriptor {
                dst: u64::MAX - 4,
                ..good
            },
            CompletionStatus::TransferSize,
            0,
        );
        let nop = Descriptor {
            op: Operation::Nop,
            ..Descriptor::decode(&good).unwrap()
        }
        .to_raw();
        check(
            RawDescriptor { src: 1, ..nop },
            CompletionStatus::NonzeroReserved,
            0,
        );
    }

    #[test]
    fn completion_record_round_trips() {
        let r = CompletionRecord {
            status: CompletionStatus::PageFault,
            fault_write: true,
            result: 1,
            fault_reason: 0x5a,
            bytes_completed: 0x1234,
            fault_addr: 0x7fff_0000_1000,
            invalid_flags: 0,
        };
        let b = r.to_bytes();
        assert_eq!(b[0], 0x83);
        assert_eq!(CompletionRecord::from_bytes(&b), Some(r));
        assert_eq!(
            CompletionRecord::from_bytes(&[0x7e; COMPLETION_RECORD_SIZE]),
            None
        );
    }

    fn arb_op() -> impl Strategy<Value = Operation> {
        let size = 1u32..=u32::MAX;
        let addr = 0u64..(1 << 57);
        prop_oneof![
            Just(Operation::Nop),
            Just(Operation::Drain),
            (addr.clone(), addr.clone(), size.clone())
                .prop_map(|(src, dst, size)| Operation::Memmove { src, dst, size }),
            (any::<u64>(), addr.clone(), size.clone())
                .prop_map(|(pattern, dst, size)| Operation::Fill { pattern, dst, size }),
            (addr.clone(), addr, size).prop_map(|(src1, src2, size)| Operation::Compare {
                src1,
                src2,
                size
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn valid_descriptors_round_trip(
            p in proptest::option::of(0u32..(1 << 20)),
            privileged: bool,
            block_on_fault: bool,
            crav: bool,
            rcr: bool,
            rec in 0u64..(1 << 40),
            op in arb_op(),
        ) {
            let rec = rec & !31;
            let completion = match (crav, rcr) {
                (false, _) => CompletionRequest::None,
                (true, false) => CompletionRequest::OnError(rec),
                (true, true) => CompletionRequest::Always(rec),
            };
            let d = Descriptor {
                pasid: p.map(|p| Pasid::new(p).unwrap()),
                privileged,
                block_on_fault,
                completion,
                op,
            };
            let raw = RawDescriptor::from_bytes(&d.encode());
            prop_assert_eq!(raw.to_bytes(), d.encode());
            prop_assert_eq!(Descriptor::decode(&raw), Ok(d));
        }

        #[test]
        fn arbitrary_bytes_decode_without_panic(bytes in proptest::collection::vec(any::<u8>(), 64)) {
            let mut b = [0u8; DESCRIPTOR_SIZE];
            b.copy_from_slice(&bytes);
            let raw = RawDescriptor::from_bytes(&b);
            prop_assert_eq!(raw.to_bytes(), b);
            if let Ok(d) = Descriptor::decode(&raw) {
                prop_assert_eq!(d.to_raw(), raw);
            }
        }
    }
}
