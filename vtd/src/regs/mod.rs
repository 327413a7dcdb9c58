//! The register file of a remapping unit (VT-d §10.4) as a state machine.
//!
//! [`RegisterFile`] keeps the registers, applies the spec's access rules to software reads
//! and writes (read-only fields preserved, write-1-to-clear status bits, commands reflected
//! in status registers) and reports what the owning model must do as [`RegEffect`]s: the
//! register file reads no memory and raises no interrupt itself. The physical IOMMU model
//! and the vIOMMU own one each and call the methods below for events the hardware detects
//! (faults, invalidation queue errors, completion, page requests).
//!
//! Access rules chosen where the spec leaves a choice:
//! - Accesses are 4 or 8 bytes, naturally aligned, inside the register page; anything else
//!   is an error ([`RegError`]) and changes nothing. 64-bit registers can be accessed as
//!   two 32-bit halves; an 8-byte access over two 32-bit registers acts on each in turn.
//! - Offsets inside the page that hold no implemented register read as 0 and ignore
//!   writes, as reserved registers do. Registers of capabilities the unit lacks (queued
//!   invalidation, interrupt remapping, page requests, virtual commands) are reserved.
//! - A GCMD write that requests several changes performs them all, in this order: SRTP,
//!   SIRTP, WBF, QIE, IRE, CFI, TE (the spec asks software for one at a time).
//! - Commands complete at once: CCMD.ICC and IOTLB_REG.IVT read back clear with the actual
//!   granularity filled in, and GSTS reflects a command as soon as GCMD is written.
//! - Disabling queued invalidation while descriptors are pending (IQH != IQT) is refused,
//!   and IQA writes are ignored while queued invalidation is enabled.

mod cap;
mod fault_record;
pub mod layout;
mod shared;

pub use cap::{Cap, Ecap};
pub use fault_record::{AddressType, FaultRecord, RequestType, FRCD_F};
pub use shared::{RegisterGuard, SharedRegisterFile};

use crate::addr::{DomainId, Pasid, SourceId};
use crate::inv_desc::{ContextCacheGranularity, InvDesc, InvDescError, IotlbGranularity};
use layout::{
    ccmd, event_control, fsts, gcmd, gsts, ics, iotlb, iq, iqercd, offset, pq, rtaddr, vcmd,
};
use smallvec::SmallVec;

/// A register access or configuration error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegError {
    /// Accesses are 4 or 8 bytes wide.
    #[error("register access of {0} bytes (only 4 and 8)")]
    Width(usize),
    /// The offset is not a multiple of the access size.
    #[error("register access at {offset:#x} is not aligned to its {size} bytes")]
    Unaligned {
        /// Byte offset of the access in the register page.
        offset: u64,
        /// Access width in bytes.
        size: usize,
    },
    /// The access does not lie inside the register page.
    #[error("register access at {offset:#x}+{size} is beyond the {limit:#x}-byte register page")]
    OutOfRange {
        /// Byte offset of the access in the register page.
        offset: u64,
        /// Access width in bytes.
        size: usize,
        /// Size of the register page in bytes.
        limit: u64,
    },
    /// A 4-byte write of a value wider than 32 bits.
    #[error("value {value:#x} does not fit a 4-byte register write")]
    ValueWidth {
        /// The value written.
        value: u64,
    },
    /// A capability field value does not fit its bits.
    #[error("{register}.{field} value {value:#x} does not fit the field")]
    FieldRange {
        /// The capability register type ("Cap" or "Ecap").
        register: &'static str,
        /// Name of the field in that type.
        field: &'static str,
        /// The value that does not fit.
        value: u64,
    },
    /// The capability names a feature the register file does not model.
    #[error("capability {0} is not modelled")]
    Unsupported(&'static str),
    /// The IOTLB or fault recording registers overlap other registers.
    #[error("{what} registers at {offset:#x} overlap other registers")]
    Overlap {
        /// Which registers: "IOTLB" or "fault recording".
        what: &'static str,
        /// Their byte offset in the register page (16 × ECAP.IRO or 16 × CAP.FRO).
        offset: u64,
    },
    /// No invalidation descriptor is waiting (queued invalidation disabled, queue empty,
    /// or stopped by an invalidation queue error).
    #[error("no invalidation descriptor is pending")]
    QueueIdle,
    /// The page request queue is full or not enabled.
    #[error("the page request queue has no free slot")]
    PageRequestQueueFull,
    /// A virtual command response without a command in progress.
    #[error("no virtual command is in progress")]
    NoVirtualCommand,
}

/// Invalidation queue error information (IQERCD_REG.IQEI, §10.4.29).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Iqei {
    /// No information.
    NotAvailable = 0,
    /// The tail pointer is beyond the queue.
    InvalidTail = 1,
    /// Fetching the descriptor failed.
    FetchError = 2,
    /// Invalid descriptor type.
    InvalidType = 3,
    /// Reserved field violation.
    ReservedField = 4,
    /// Invalid descriptor width.
    InvalidWidth = 5,
    /// The tail is not 256-bit aligned while 256-bit descriptors are in use.
    TailMisaligned = 6,
    /// The descriptor is not valid in the current translation table mode.
    InvalidTtm = 7,
}

impl From<&InvDescError> for Iqei {
    fn from(e: &InvDescError) -> Self {
        match e {
            InvDescError::UnknownType(_) => Iqei::InvalidType,
            InvDescError::Reserved { .. }
            | InvDescError::ReservedValue { .. }
            | InvDescError::FieldRange { .. } => Iqei::ReservedField,
        }
    }
}

/// Translation table mode (RTADDR_REG.TTM, §10.4.6).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Ttm {
    /// Legacy root and context entries.
    #[default]
    Legacy = 0,
    /// Scalable-mode root and context entries.
    Scalable = 1,
    /// Reserved: DMA requests fault.
    Reserved = 2,
    /// All DMA is aborted.
    AbortDma = 3,
}

/// The root table pointer latched by GCMD.SRTP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RootTable {
    /// Root table address.
    pub addr: u64,
    /// Translation table mode.
    pub ttm: Ttm,
}

impl RootTable {
    fn from_reg(raw: u64) -> Self {
        RootTable {
            addr: raw & rtaddr::RTA,
            ttm: match (raw & rtaddr::TTM) >> rtaddr::TTM_SHIFT {
                0 => Ttm::Legacy,
                1 => Ttm::Scalable,
                2 => Ttm::Reserved,
                _ => Ttm::AbortDma,
            },
        }
    }
}

/// The three interrupt-generating event sources of a remapping unit (§5.1.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventSource {
    /// Fault event: FECTL/FEDATA/FEADDR/FEUADDR.
    Fault = 0,
    /// Invalidation completion event: IECTL/IEDATA/IEADDR/IEUADDR.
    InvalidationCompletion = 1,
    /// Page request event: PECTL/PEDATA/PEADDR/PEUADDR.
    PageRequest = 2,
}

/// An MSI the owner must deliver: the event's address and data registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Interrupt {
    /// The event that raised the interrupt.
    pub source: EventSource,
    /// Upper address register in bits 63:32, address register in bits 31:0.
    pub address: u64,
    /// The event's data register (FEDATA, IEDATA or PEDATA).
    pub data: u32,
}

/// A virtual command written to VCMD_REG (§10.4.44).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VirtualCommand {
    /// Allocate a PASID.
    AllocPasid,
    /// Free a PASID; `None` when the operand is not a 20-bit PASID.
    FreePasid(Option<Pasid>),
    /// A command this architecture does not define.
    Unknown {
        /// Command code (VCMD bits 7:0).
        cmd: u8,
        /// Operand (VCMD bits 63:8).
        operand: u64,
    },
}

/// The owner's answer to a virtual command, written to VCRSP_REG.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VcmdResponse {
    /// Allocation succeeded.
    Allocated(Pasid),
    /// No PASID is available (status code 2).
    NoPasidAvailable,
    /// The PASID was freed.
    Freed,
    /// The PASID to free is not allocated (status code 2).
    InvalidPasid,
    /// The command is not supported (status code 1).
    InvalidCommand,
}

impl VcmdResponse {
    fn to_raw(self) -> u64 {
        let sc = |code: u64| code << vcmd::VCRSP_SC_SHIFT;
        match self {
            VcmdResponse::Allocated(p) => (p.raw() as u64) << vcmd::VCRSP_RESULT_SHIFT,
            VcmdResponse::Freed => 0,
            VcmdResponse::NoPasidAvailable | VcmdResponse::InvalidPasid => sc(2),
            VcmdResponse::InvalidCommand => sc(1),
        }
    }
}

/// Most effects one register write can have: GCMD's SRTP, SIRTP, WBF, QIE (with the
/// tail check it makes), IRE and TE in one write.
pub const MAX_REG_EFFECTS: usize = 7;

/// What one register write asks the owning model to do, in order; held inline, so a
/// write allocates nothing.
pub type RegEffects = SmallVec<[RegEffect; MAX_REG_EFFECTS]>;

/// What a register write asks the owning model to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RegEffect {
    /// GCMD.SRTP latched a root table pointer.
    RootTableSet(RootTable),
    /// GCMD.TE changed translation.
    TranslationEnabled(bool),
    /// GCMD.QIE changed queued invalidation.
    QueuedInvalidationEnabled(bool),
    /// GCMD.IRE changed interrupt remapping.
    InterruptRemappingEnabled(bool),
    /// GCMD.SIRTP latched the interrupt remapping table address register.
    InterruptRemapTableSet(u64),
    /// GCMD.WBF: flush the write buffer.
    WriteBufferFlush,
    /// Descriptors wait between IQH and IQT: fetch them ([`RegisterFile::next_inv_desc`]).
    ProcessInvalidationQueue,
    /// A register-based invalidation (CCMD_REG or IOTLB_REG), as the equivalent
    /// descriptor.
    RegisterInvalidation(InvDesc),
    /// A virtual command: answer with [`RegisterFile::complete_virtual_command`].
    VirtualCommand(VirtualCommand),
    /// Deliver an interrupt.
    Interrupt(Interrupt),
}

/// What became of a fault handed to [`RegisterFile::record_fault`] (§7.2.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultOutcome {
    /// Recorded in the fault recording register of this index.
    Recorded(usize),
    /// The next register still held a fault: FSTS.PFO is now set, the fault is lost.
    Overflow,
    /// FSTS.PFO was already set: the fault is lost.
    Dropped,
}

/// The geometry and pointers of the invalidation queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InvQueue {
    /// Base address (IQA_REG).
    pub base: u64,
    /// Descriptor size: 16 or 32 bytes (IQA_REG.DW).
    pub desc_size: u64,
    /// Number of descriptors the queue holds.
    pub entries: u64,
    /// Index of the next descriptor hardware reads.
    pub head: u64,
    /// Index after the last descriptor software queued.
    pub tail: u64,
}

/// The geometry and pointers of the page request queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageRequestQueue {
    /// Base address (PQA_REG).
    pub base: u64,
    /// Number of 32-byte descriptors the queue holds.
    pub entries: u64,
    /// Index of the next descriptor software reads.
    pub head: u64,
    /// Index of the slot hardware writes next.
    pub tail: u64,
}

/// An implemented register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reg {
    Ver,
    Cap,
    Ecap,
    Gcmd,
    Gsts,
    Rtaddr,
    Ccmd,
    Fsts,
    Ctl(EventSource),
    Data(EventSource),
    Addr(EventSource),
    UpperAddr(EventSource),
    Iqh,
    Iqt,
    Iqa,
    Ics,
    Iqercd,
    Irta,
    Pqh,
    Pqt,
    Pqa,
    Prs,
    Vccap,
    Vcmd,
    Vcrsp,
    Iva,
    Iotlb,
    FrcdLow(usize),
    FrcdHigh(usize),
}

/// The registers at fixed offsets, with their widths.
const FIXED: [(u64, Reg, u64); 33] = [
    (offset::VER, Reg::Ver, 4),
    (offset::CAP, Reg::Cap, 8),
    (offset::ECAP, Reg::Ecap, 8),
    (offset::GCMD, Reg::Gcmd, 4),
    (offset::GSTS, Reg::Gsts, 4),
    (offset::RTADDR, Reg::Rtaddr, 8),
    (offset::CCMD, Reg::Ccmd, 8),
    (offset::FSTS, Reg::Fsts, 4),
    (offset::FECTL, Reg::Ctl(EventSource::Fault), 4),
    (offset::FEDATA, Reg::Data(EventSource::Fault), 4),
    (offset::FEADDR, Reg::Addr(EventSource::Fault), 4),
    (offset::FEUADDR, Reg::UpperAddr(EventSource::Fault), 4),
    (offset::IQH, Reg::Iqh, 8),
    (offset::IQT, Reg::Iqt, 8),
    (offset::IQA, Reg::Iqa, 8),
    (offset::ICS, Reg::Ics, 4),
    (
        offset::IECTL,
        Reg::Ctl(EventSource::InvalidationCompletion),
        4,
    ),
    (
        offset::IEDATA,
        Reg::Data(EventSource::InvalidationCompletion),
        4,
    ),
    (
        offset::IEADDR,
        Reg::Addr(EventSource::InvalidationCompletion),
        4,
    ),
    (
        offset::IEUADDR,
        Reg::UpperAddr(EventSource::InvalidationCompletion),
        4,
    ),
    (offset::IQERCD, Reg::Iqercd, 8),
    (offset::IRTA, Reg::Irta, 8),
    (offset::PQH, Reg::Pqh, 8),
    (offset::PQT, Reg::Pqt, 8),
    (offset::PQA, Reg::Pqa, 8),
    (offset::PRS, Reg::Prs, 4),
    (offset::PECTL, Reg::Ctl(EventSource::PageRequest), 4),
    (offset::PEDATA, Reg::Data(EventSource::PageRequest), 4),
    (offset::PEADDR, Reg::Addr(EventSource::PageRequest), 4),
    (offset::PEUADDR, Reg::UpperAddr(EventSource::PageRequest), 4),
    (offset::VCCAP, Reg::Vccap, 8),
    (offset::VCMD, Reg::Vcmd, 8),
    (offset::VCRSP, Reg::Vcrsp, 8),
];

/// The dwords the fixed registers span: every fixed register ends below this.
const FIXED_DWORDS: usize = ((offset::VCRSP + 8) / 4) as usize;

/// For each dword below [`FIXED_DWORDS`], 1 + the index in [`FIXED`] of the register
/// holding it, or 0: the offset's register in one load instead of a scan of [`FIXED`].
const FIXED_BY_DWORD: [u8; FIXED_DWORDS] = {
    let mut table = [0; FIXED_DWORDS];
    let mut i = 0;
    while i < FIXED.len() {
        let (base, _, width) = FIXED[i];
        let mut dword = base / 4;
        while dword < (base + width) / 4 {
            // Fixed registers never overlap (checked by the `fixed_registers_index` test).
            table[dword as usize] = i as u8 + 1;
            dword += 1;
        }
        i += 1;
    }
    table
};

/// The architecture version the unit reports (VER_REG): 1.0.
const VERSION: u64 = 0x10;
/// The smallest register page.
const PAGE: u64 = 0x1000;

/// The interrupt registers of one event source.
#[derive(Clone, Copy, Debug)]
struct EventRegs {
    ctl: u32,
    data: u32,
    addr: u32,
    upper_addr: u32,
}

/// The register file of one remapping unit.
#[derive(Clone, Debug)]
pub struct RegisterFile {
    cap: Cap,
    ecap: Ecap,
    cap_raw: u64,
    ecap_raw: u64,
    size: u64,
    gsts: u32,
    rtaddr: u64,
    root_table: RootTable,
    ccmd: u64,
    /// FSTS without PPF, which is computed from the fault recording registers.
    fsts: u32,
    events: [EventRegs; 3],
    iqh: u64,
    iqt: u64,
    iqa: u64,
    ics: u32,
    iqercd: u64,
    irta: u64,
    pqh: u64,
    pqt: u64,
    pqa: u64,
    prs: u32,
    vcmd: u64,
    vcrsp: u64,
    iva: u64,
    iotlb: u64,
    frcd: Vec<[u64; 2]>,
    /// The fault recording register the next fault goes to (§7.2.1).
    fault_index: usize,
}

/// `old` with the bits of `value` that `mask` selects and software may write.
const fn merge(old: u64, value: u64, mask: u64, writable: u64) -> u64 {
    let m = mask & writable;
    (old & !m) | (value & m)
}

impl RegisterFile {
    /// A register file in its reset state, for a unit with these capabilities.
    ///
    /// Advanced fault logging and protected memory regions are not modelled; the IOTLB and
    /// fault recording registers (ECAP.IRO, CAP.FRO) must not overlap other registers.
    pub fn new(cap: Cap, ecap: Ecap) -> Result<Self, RegError> {
        let cap_raw = cap.to_raw()?;
        let ecap_raw = ecap.to_raw()?;
        for (present, name) in [(cap.afl, "AFL"), (cap.plmr, "PLMR"), (cap.phmr, "PHMR")] {
            if present {
                return Err(RegError::Unsupported(name));
            }
        }
        let iotlb = (ecap.iotlb_offset(), 16);
        let frcd = (
            cap.fault_recording_offset(),
            16 * cap.fault_recording_count() as u64,
        );
        let overlaps =
            |(start, len): (u64, u64), (s, l): (u64, u64)| start < s + l && s < start + len;
        let fixed = FIXED
            .iter()
            .map(|&(o, _, w)| (o, w))
            .chain([(offset::MTRR_START, offset::MTRR_END - offset::MTRR_START)]);
        for (what, span) in [("IOTLB", iotlb), ("fault recording", frcd)] {
            if fixed.clone().any(|f| overlaps(span, f)) {
                return Err(RegError::Overlap {
                    what,
                    offset: span.0,
                });
            }
        }
        if overlaps(iotlb, frcd) {
            return Err(RegError::Overlap {
                what: "fault recording",
                offset: frcd.0,
            });
        }
        let end = (iotlb.0 + iotlb.1).max(frcd.0 + frcd.1);
        let reset_event = EventRegs {
            ctl: event_control::IM,
            data: 0,
            addr: 0,
            upper_addr: 0,
        };
        Ok(RegisterFile {
            cap,
            ecap,
            cap_raw,
            ecap_raw,
            size: end.div_ceil(PAGE).max(1) * PAGE,
            gsts: 0,
            rtaddr: 0,
            root_table: RootTable::default(),
            ccmd: 0,
            fsts: 0,
            events: [reset_event; 3],
            iqh: 0,
            iqt: 0,
            iqa: 0,
            ics: 0,
            iqercd: 0,
            irta: 0,
            pqh: 0,
            pqt: 0,
            pqa: 0,
            prs: 0,
            vcmd: 0,
            vcrsp: 0,
            iva: 0,
            iotlb: 0,
            frcd: vec![[0; 2]; cap.fault_recording_count()],
            fault_index: 0,
        })
    }

    /// The capability register.
    pub fn cap(&self) -> Cap {
        self.cap
    }

    /// The extended capability register.
    pub fn ecap(&self) -> Ecap {
        self.ecap
    }

    /// Size of the register page in bytes (a multiple of 4 KiB).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The global status register.
    pub fn gsts(&self) -> u32 {
        self.gsts
    }

    /// Whether DMA remapping is enabled (GSTS.TES).
    pub fn translation_enabled(&self) -> bool {
        self.gsts & gsts::TES != 0
    }

    /// Whether queued invalidation is enabled (GSTS.QIES).
    pub fn qi_enabled(&self) -> bool {
        self.gsts & gsts::QIES != 0
    }

    /// The root table pointer latched by the last GCMD.SRTP (what translation uses), not
    /// the RTADDR register as last written.
    pub fn root_table(&self) -> RootTable {
        self.root_table
    }

    /// The fault status register, with PPF computed from the fault recording registers.
    pub fn fsts(&self) -> u32 {
        self.fsts | if self.ppf() { fsts::PPF } else { 0 }
    }

    /// The invalidation queue error record register.
    pub fn iqercd(&self) -> u64 {
        self.iqercd
    }

    /// The invalidation completion status register.
    pub fn ics(&self) -> u32 {
        self.ics
    }

    /// The page request status register.
    pub fn prs(&self) -> u32 {
        self.prs
    }

    /// The fault recording register `index` (without the F bit) and whether F is set;
    /// `None` past the last register or when the register holds the reserved AT value.
    pub fn fault_record(&self, index: usize) -> Option<(FaultRecord, bool)> {
        let raw = *self.frcd.get(index)?;
        Some((FaultRecord::from_raw(raw)?, raw[1] & FRCD_F != 0))
    }

    fn ppf(&self) -> bool {
        self.frcd.iter().any(|r| r[1] & FRCD_F != 0)
    }

    fn check_access(&self, offset: u64, size: usize) -> Result<(), RegError> {
        if size != 4 && size != 8 {
            return Err(RegError::Width(size));
        }
        // `size` is 4 or 8: a mask, not a division, tests the alignment.
        if offset & (size as u64 - 1) != 0 {
            return Err(RegError::Unaligned { offset, size });
        }
        if offset
            .checked_add(size as u64)
            .is_none_or(|end| end > self.size)
        {
            return Err(RegError::OutOfRange {
                offset,
                size,
                limit: self.size,
            });
        }
        Ok(())
    }

    /// Whether the unit implements the registers of `reg`'s feature.
    fn present(&self, reg: Reg) -> bool {
        match reg {
            Reg::Iqh
            | Reg::Iqt
            | Reg::Iqa
            | Reg::Ics
            | Reg::Iqercd
            | Reg::Ctl(EventSource::InvalidationCompletion)
            | Reg::Data(EventSource::InvalidationCompletion)
            | Reg::Addr(EventSource::InvalidationCompletion)
            | Reg::UpperAddr(EventSource::InvalidationCompletion) => self.ecap.qi,
            Reg::Irta => self.ecap.ir,
            Reg::Pqh
            | Reg::Pqt
            | Reg::Pqa
            | Reg::Prs
            | Reg::Ctl(EventSource::PageRequest)
            | Reg::Data(EventSource::PageRequest)
            | Reg::Addr(EventSource::PageRequest)
            | Reg::UpperAddr(EventSource::PageRequest) => self.ecap.prs,
            Reg::Vccap | Reg::Vcmd | Reg::Vcrsp => self.ecap.vcs,
            _ => true,
        }
    }

    /// The implemented register holding the byte at `offset`: register, its offset, width.
    fn locate(&self, offset: u64) -> Option<(Reg, u64, u64)> {
        let fixed = match FIXED_BY_DWORD.get((offset / 4) as usize) {
            Some(&slot) if slot != 0 => Some(FIXED[slot as usize - 1]),
            _ => None,
        };
        let found = fixed.or_else(|| {
            let iro = self.ecap.iotlb_offset();
            let frcd = self.cap.fault_recording_offset();
            let frcd_end = frcd + 16 * self.frcd.len() as u64;
            if (iro..iro + 8).contains(&offset) {
                Some((iro, Reg::Iva, 8))
            } else if (iro + 8..iro + 16).contains(&offset) {
                Some((iro + 8, Reg::Iotlb, 8))
            } else if (frcd..frcd_end).contains(&offset) {
                let index = ((offset - frcd) / 16) as usize;
                let base = frcd + 16 * index as u64;
                if offset - base < 8 {
                    Some((base, Reg::FrcdLow(index), 8))
                } else {
                    Some((base + 8, Reg::FrcdHigh(index), 8))
                }
            } else {
                None
            }
        });
        found
            .filter(|&(_, reg, _)| self.present(reg))
            .map(|(base, reg, width)| (reg, base, width))
    }

    /// Reads `size` (4 or 8) bytes at `offset`.
    pub fn read(&self, offset: u64, size: usize) -> Result<u64, RegError> {
        self.check_access(offset, size)?;
        Ok(match (size, self.locate(offset)) {
            (8, Some((reg, base, 8))) if base == offset => self.read_reg(reg),
            (8, _) => self.read_dword(offset) as u64 | (self.read_dword(offset + 4) as u64) << 32,
            _ => self.read_dword(offset) as u64,
        })
    }

    fn read_dword(&self, offset: u64) -> u32 {
        match self.locate(offset) {
            Some((reg, base, _)) => (self.read_reg(reg) >> ((offset - base) * 8)) as u32,
            None => 0,
        }
    }

    fn read_reg(&self, reg: Reg) -> u64 {
        match reg {
            Reg::Ver => VERSION,
            Reg::Cap => self.cap_raw,
            Reg::Ecap => self.ecap_raw,
            Reg::Gcmd => 0,
            Reg::Gsts => self.gsts as u64,
            Reg::Rtaddr => self.rtaddr,
            Reg::Ccmd => self.ccmd,
            Reg::Fsts => self.fsts() as u64,
            Reg::Ctl(s) => self.events[s as usize].ctl as u64,
            Reg::Data(s) => self.events[s as usize].data as u64,
            Reg::Addr(s) => self.events[s as usize].addr as u64,
            Reg::UpperAddr(s) => self.events[s as usize].upper_addr as u64,
            Reg::Iqh => self.iqh,
            Reg::Iqt => self.iqt,
            Reg::Iqa => self.iqa,
            Reg::Ics => self.ics as u64,
            Reg::Iqercd => self.iqercd,
            Reg::Irta => self.irta,
            Reg::Pqh => self.pqh,
            Reg::Pqt => self.pqt,
            Reg::Pqa => self.pqa,
            Reg::Prs => self.prs as u64,
            Reg::Vccap => vcmd::VCCAP_PAS,
            Reg::Vcmd => self.vcmd,
            Reg::Vcrsp => self.vcrsp,
            Reg::Iva => self.iva,
            Reg::Iotlb => self.iotlb,
            Reg::FrcdLow(i) => self.frcd[i][0],
            Reg::FrcdHigh(i) => self.frcd[i][1],
        }
    }

    /// Writes `size` (4 or 8) bytes at `offset` and appends to `effects` what the owner
    /// must do; a refused access appends nothing. The effects go to the caller's buffer
    /// rather than being returned, so a write copies none of them.
    pub fn write(
        &mut self,
        offset: u64,
        size: usize,
        value: u64,
        effects: &mut RegEffects,
    ) -> Result<(), RegError> {
        self.check_access(offset, size)?;
        if size == 4 && value > u32::MAX as u64 {
            return Err(RegError::ValueWidth { value });
        }
        match (size, self.locate(offset)) {
            (8, Some((reg, base, 8))) if base == offset => {
                self.write_reg(reg, value, u64::MAX, effects)
            }
            (8, _) => {
                self.write_dword(offset, value as u32, effects);
                self.write_dword(offset + 4, (value >> 32) as u32, effects);
            }
            _ => self.write_dword(offset, value as u32, effects),
        }
        Ok(())
    }

    fn write_dword(&mut self, offset: u64, value: u32, effects: &mut RegEffects) {
        if let Some((reg, base, _)) = self.locate(offset) {
            let shift = (offset - base) * 8;
            self.write_reg(reg, (value as u64) << shift, 0xffff_ffff << shift, effects);
        }
    }

    /// Applies a write of the `mask`ed bits of `value` to `reg`.
    fn write_reg(&mut self, reg: Reg, value: u64, mask: u64, effects: &mut RegEffects) {
        let eim_data = if self.ecap.eim { 0xffff_ffff } else { 0xffff };
        match reg {
            Reg::Ver
            | Reg::Cap
            | Reg::Ecap
            | Reg::Gsts
            | Reg::Iqh
            | Reg::Iqercd
            | Reg::Vccap
            | Reg::Vcrsp
            | Reg::FrcdLow(_) => {}
            Reg::Gcmd => self.global_command(value as u32, effects),
            Reg::Rtaddr => {
                let ttm = (self.ecap.smts as u64) << rtaddr::TTM_SHIFT
                    | (self.ecap.adms as u64) << (rtaddr::TTM_SHIFT + 1);
                self.rtaddr = merge(self.rtaddr, value, mask, rtaddr::RTA | ttm);
            }
            Reg::Ccmd => {
                self.ccmd = merge(self.ccmd, value, mask, ccmd::WRITABLE);
                if mask & ccmd::ICC != 0 && self.ccmd & ccmd::ICC != 0 {
                    self.context_command(effects);
                }
            }
            Reg::Fsts => {
                let cleared = self.fsts & value as u32 & mask as u32 & fsts::RW1C;
                self.fsts &= !cleared;
                self.status_changed(EventSource::Fault);
                // Clearing IQE lets the queue run again (§6.5.2.10).
                if cleared & fsts::IQE != 0 && self.next_inv_desc().is_some() {
                    effects.push(RegEffect::ProcessInvalidationQueue);
                }
            }
            Reg::Ctl(source) => {
                let ev = &mut self.events[source as usize];
                ev.ctl = merge(ev.ctl as u64, value, mask, event_control::IM as u64) as u32;
                if ev.ctl & (event_control::IM | event_control::IP) == event_control::IP {
                    ev.ctl &= !event_control::IP;
                    effects.push(RegEffect::Interrupt(self.interrupt(source)));
                }
            }
            Reg::Data(s) => {
                let ev = &mut self.events[s as usize];
                ev.data = merge(ev.data as u64, value, mask, eim_data) as u32;
            }
            Reg::Addr(s) => {
                let ev = &mut self.events[s as usize];
                ev.addr = merge(ev.addr as u64, value, mask, 0xffff_fffc) as u32;
            }
            Reg::UpperAddr(s) => {
                let ev = &mut self.events[s as usize];
                ev.upper_addr = merge(ev.upper_addr as u64, value, mask, 0xffff_ffff) as u32;
            }
            Reg::Iqt => {
                self.iqt = merge(self.iqt, value, mask, iq::OFFSET);
                if mask & iq::OFFSET != 0 {
                    self.tail_written(effects);
                }
            }
            Reg::Iqa => {
                if !self.qi_enabled() {
                    let dw = if self.ecap.smts { iq::IQA_DW } else { 0 };
                    self.iqa = merge(self.iqa, value, mask, iq::IQA_BASE | dw | iq::IQA_QS);
                }
            }
            Reg::Ics => {
                self.ics &= !(value as u32 & mask as u32 & ics::IWC);
                self.status_changed(EventSource::InvalidationCompletion);
            }
            Reg::Irta => {
                let eime = if self.ecap.eim { 1 << 11 } else { 0 };
                self.irta = merge(self.irta, value, mask, !0x7f0 & !(1 << 11) | eime);
            }
            Reg::Pqh => self.pqh = merge(self.pqh, value, mask, pq::OFFSET),
            Reg::Pqt => self.pqt = merge(self.pqt, value, mask, pq::OFFSET),
            Reg::Pqa => self.pqa = merge(self.pqa, value, mask, pq::PQA_BASE | pq::PQA_PQS),
            Reg::Prs => {
                self.prs &= !(value as u32 & mask as u32 & (pq::PPR | pq::PRO));
                self.status_changed(EventSource::PageRequest);
            }
            Reg::Vcmd => {
                if self.vcrsp & vcmd::VCRSP_IP == 0 {
                    self.vcmd = merge(self.vcmd, value, mask, u64::MAX);
                    if mask & vcmd::CMD != 0 {
                        self.vcrsp = vcmd::VCRSP_IP;
                        effects.push(RegEffect::VirtualCommand(self.virtual_command()));
                    }
                }
            }
            Reg::Iva => self.iva = merge(self.iva, value, mask, iotlb::IVA_WRITABLE),
            Reg::Iotlb => {
                self.iotlb = merge(self.iotlb, value, mask, iotlb::WRITABLE);
                if mask & iotlb::IVT != 0 && self.iotlb & iotlb::IVT != 0 {
                    self.iotlb_command(effects);
                }
            }
            Reg::FrcdHigh(i) => {
                self.frcd[i][1] &= !(value & mask & FRCD_F);
                self.status_changed(EventSource::Fault);
            }
        }
    }

    /// GCMD_REG write (§10.4.4): one-shot commands act when set; enables act when they
    /// differ from the status.
    fn global_command(&mut self, cmd: u32, effects: &mut RegEffects) {
        if cmd & gcmd::SRTP != 0 {
            self.root_table = RootTable::from_reg(self.rtaddr);
            self.gsts |= gsts::RTPS;
            effects.push(RegEffect::RootTableSet(self.root_table));
        }
        if cmd & gcmd::SIRTP != 0 && self.ecap.ir {
            self.gsts |= gsts::IRTPS;
            effects.push(RegEffect::InterruptRemapTableSet(self.irta));
        }
        if cmd & gcmd::WBF != 0 && self.cap.rwbf {
            effects.push(RegEffect::WriteBufferFlush);
        }
        let changed = |bit: u32, status: u32, gsts: u32| (cmd & bit != 0) != (gsts & status != 0);
        if self.ecap.qi && changed(gcmd::QIE, gsts::QIES, self.gsts) {
            if cmd & gcmd::QIE != 0 {
                self.gsts |= gsts::QIES;
                effects.push(RegEffect::QueuedInvalidationEnabled(true));
                self.tail_written(effects);
            } else if self.iqh == self.iqt {
                self.gsts &= !gsts::QIES;
                self.iqh = 0;
                effects.push(RegEffect::QueuedInvalidationEnabled(false));
            }
        }
        if self.ecap.ir && changed(gcmd::IRE, gsts::IRES, self.gsts) {
            self.gsts ^= gsts::IRES;
            effects.push(RegEffect::InterruptRemappingEnabled(
                self.gsts & gsts::IRES != 0,
            ));
        }
        if self.ecap.ir && changed(gcmd::CFI, gsts::CFIS, self.gsts) {
            self.gsts ^= gsts::CFIS;
        }
        if changed(gcmd::TE, gsts::TES, self.gsts) {
            self.gsts ^= gsts::TES;
            effects.push(RegEffect::TranslationEnabled(self.translation_enabled()));
        }
        if self.gsts & (gsts::TES | gsts::IRES) == 0 {
            self.fault_index = 0;
        }
    }

    /// CCMD_REG with ICC set (§10.4.7): a register-based context-cache invalidation,
    /// refused while queued invalidation is enabled.
    fn context_command(&mut self, effects: &mut RegEffects) {
        let cirg = (self.ccmd >> ccmd::CIRG_SHIFT) & 3;
        let granularity = match cirg {
            1 => Some(ContextCacheGranularity::Global),
            2 => Some(ContextCacheGranularity::DomainSelective),
            3 => Some(ContextCacheGranularity::DeviceSelective),
            _ => None,
        }
        .filter(|_| !self.qi_enabled());
        let caig = match granularity {
            Some(granularity) => {
                effects.push(RegEffect::RegisterInvalidation(InvDesc::ContextCache {
                    granularity,
                    did: DomainId(self.ccmd as u16),
                    sid: SourceId::from_rid((self.ccmd >> ccmd::SID_SHIFT) as u16),
                    fm: ((self.ccmd >> ccmd::FM_SHIFT) & 3) as u8,
                }));
                granularity as u64
            }
            None => 0,
        };
        self.ccmd = self.ccmd & !ccmd::ICC & !(3 << ccmd::CAIG_SHIFT) | caig << ccmd::CAIG_SHIFT;
    }

    /// IOTLB_REG with IVT set (§10.4.8.1): a register-based IOTLB invalidation, refused
    /// while queued invalidation is enabled. Without CAP.PSI, or with an address mask above
    /// CAP.MAMV, a page-selective request is performed domain-selective.
    fn iotlb_command(&mut self, effects: &mut RegEffects) {
        let am = (self.iva & iotlb::IVA_AM) as u8;
        let granularity = match (self.iotlb >> iotlb::IIRG_SHIFT) & 3 {
            1 => Some(IotlbGranularity::Global),
            2 => Some(IotlbGranularity::DomainSelective),
            3 if self.cap.psi && am <= self.cap.mamv => Some(IotlbGranularity::PageSelective),
            3 => Some(IotlbGranularity::DomainSelective),
            _ => None,
        }
        .filter(|_| !self.qi_enabled());
        let iaig = match granularity {
            Some(granularity) => {
                effects.push(RegEffect::RegisterInvalidation(InvDesc::Iotlb {
                    granularity,
                    dr: self.iotlb & iotlb::DR != 0,
                    dw: self.iotlb & iotlb::DW != 0,
                    did: DomainId((self.iotlb >> iotlb::DID_SHIFT) as u16),
                    addr: self.iva & !0xfff,
                    ih: self.iva & iotlb::IVA_IH != 0,
                    am,
                }));
                granularity as u64
            }
            None => 0,
        };
        self.iotlb =
            self.iotlb & !iotlb::IVT & !(3 << iotlb::IAIG_SHIFT) | iaig << iotlb::IAIG_SHIFT;
    }

    fn virtual_command(&self) -> VirtualCommand {
        let operand = self.vcmd >> vcmd::OPERAND_SHIFT;
        match (self.vcmd & vcmd::CMD) as u8 {
            vcmd::ALLOC_PASID => VirtualCommand::AllocPasid,
            vcmd::FREE_PASID => VirtualCommand::FreePasid(
                u32::try_from(operand).ok().and_then(|p| Pasid::new(p).ok()),
            ),
            cmd => VirtualCommand::Unknown { cmd, operand },
        }
    }

    /// Answers the virtual command in progress (VCRSP_REG, §10.4.45).
    pub fn complete_virtual_command(&mut self, response: VcmdResponse) -> Result<(), RegError> {
        if self.vcrsp & vcmd::VCRSP_IP == 0 {
            return Err(RegError::NoVirtualCommand);
        }
        self.vcrsp = response.to_raw();
        Ok(())
    }

    /// The MSI of an event source.
    fn interrupt(&self, source: EventSource) -> Interrupt {
        let ev = &self.events[source as usize];
        Interrupt {
            source,
            address: (ev.upper_addr as u64) << 32 | ev.addr as u64,
            data: ev.data,
        }
    }

    /// Whether an event source has a status bit set that software has not cleared.
    fn status_pending(&self, source: EventSource) -> bool {
        match source {
            EventSource::Fault => self.fsts() & (fsts::RW1C | fsts::PPF) != 0,
            EventSource::InvalidationCompletion => self.ics & ics::IWC != 0,
            EventSource::PageRequest => self.prs & (pq::PPR | pq::PRO) != 0,
        }
    }

    /// A new interrupt condition (§10.4.10 IP): delivered now unless masked, else pending.
    fn raise(&mut self, source: EventSource) -> Option<Interrupt> {
        let ev = &mut self.events[source as usize];
        if ev.ctl & event_control::IM != 0 {
            ev.ctl |= event_control::IP;
            None
        } else {
            Some(self.interrupt(source))
        }
    }

    /// Software cleared status bits: once all are clear, a pending interrupt is dropped.
    fn status_changed(&mut self, source: EventSource) {
        if !self.status_pending(source) {
            self.events[source as usize].ctl &= !event_control::IP;
        }
    }

    /// Sets fault status bits; a new interrupt condition only if none was set before.
    fn set_fault_status(&mut self, bits: u32) -> Option<Interrupt> {
        let pending = self.status_pending(EventSource::Fault);
        self.fsts |= bits;
        if pending {
            None
        } else {
            self.raise(EventSource::Fault)
        }
    }

    /// Records a fault in the next fault recording register (primary fault logging,
    /// §7.2.1) and returns where it went and the fault event to deliver, if any.
    pub fn record_fault(&mut self, record: &FaultRecord) -> (FaultOutcome, Option<Interrupt>) {
        if self.fsts & fsts::PFO != 0 {
            return (FaultOutcome::Dropped, None);
        }
        let index = self.fault_index;
        if self.frcd[index][1] & FRCD_F != 0 {
            // PPF is set, so the overflow is no new interrupt condition.
            self.fsts |= fsts::PFO;
            return (FaultOutcome::Overflow, None);
        }
        let pending = self.status_pending(EventSource::Fault);
        if !self.ppf() {
            self.fsts = self.fsts & !fsts::FRI | (index as u32) << fsts::FRI_SHIFT;
        }
        let [low, high] = record.to_raw();
        self.frcd[index] = [low, high | FRCD_F];
        self.fault_index = (index + 1) % self.frcd.len();
        let interrupt = if pending {
            None
        } else {
            self.raise(EventSource::Fault)
        };
        (FaultOutcome::Recorded(index), interrupt)
    }

    /// Reports an invalidation queue error (FSTS.IQE, IQERCD.IQEI; §6.5.2.10): the queue
    /// stops with IQH at the offending descriptor until software clears IQE.
    pub fn set_iqe(&mut self, iqei: Iqei) -> Option<Interrupt> {
        if self.fsts & fsts::IQE != 0 {
            return None;
        }
        self.iqercd = self.iqercd & !iqercd::IQEI | iqei as u64;
        self.set_fault_status(fsts::IQE)
    }

    /// Reports an invalidation completion error from a device (FSTS.ICE, IQERCD.ICESID).
    pub fn set_ice(&mut self, sid: SourceId) -> Option<Interrupt> {
        self.iqercd = self.iqercd & !(0xffff << iqercd::ICESID_SHIFT)
            | (sid.rid() as u64) << iqercd::ICESID_SHIFT;
        self.set_fault_status(fsts::ICE)
    }

    /// Reports a device-TLB invalidation time-out (FSTS.ITE, IQERCD.ITESID).
    pub fn set_ite(&mut self, sid: SourceId) -> Option<Interrupt> {
        self.iqercd = self.iqercd & !(0xffff << iqercd::ITESID_SHIFT)
            | (sid.rid() as u64) << iqercd::ITESID_SHIFT;
        self.set_fault_status(fsts::ITE)
    }

    /// An invalidation wait descriptor with IF completed: sets ICS.IWC and raises an
    /// invalidation completion event unless IWC was already set.
    pub fn set_iwc(&mut self) -> Option<Interrupt> {
        if self.ics & ics::IWC != 0 {
            return None;
        }
        self.ics |= ics::IWC;
        self.raise(EventSource::InvalidationCompletion)
    }

    /// The invalidation queue, while queued invalidation is enabled.
    pub fn inv_queue(&self) -> Option<InvQueue> {
        if !self.qi_enabled() {
            return None;
        }
        let dw256 = self.iqa & iq::IQA_DW != 0;
        let desc_size = if dw256 { 32 } else { 16 };
        Some(InvQueue {
            base: self.iqa & iq::IQA_BASE,
            desc_size,
            entries: (4096 << (self.iqa & iq::IQA_QS)) / desc_size,
            head: self.iqh / desc_size,
            tail: self.iqt / desc_size,
        })
    }

    /// The address of the descriptor at IQH when one is waiting: queued invalidation
    /// enabled, IQH != IQT, and no invalidation queue error.
    pub fn next_inv_desc(&self) -> Option<u64> {
        let q = self.inv_queue()?;
        let ready = self.fsts & fsts::IQE == 0 && q.head != q.tail && q.tail < q.entries;
        ready.then_some(q.base + q.head * q.desc_size)
    }

    /// Moves IQH past the descriptor [`Self::next_inv_desc`] gave, wrapping at the end.
    pub fn advance_iqh(&mut self) -> Result<(), RegError> {
        self.next_inv_desc().ok_or(RegError::QueueIdle)?;
        let q = self.inv_queue().ok_or(RegError::QueueIdle)?;
        self.iqh = (q.head + 1) % q.entries * q.desc_size;
        Ok(())
    }

    /// Moves IQH past up to `n` descriptors at once, as [`Self::advance_iqh`] `n` times
    /// would, stopping at IQT (or at once while the queue is stopped or idle); the number
    /// it moved past.
    pub fn advance_iqh_by(&mut self, n: u64) -> u64 {
        if self.next_inv_desc().is_none() {
            return 0;
        }
        let Some(q) = self.inv_queue() else {
            return 0;
        };
        // `next_inv_desc` proved head != tail and both below `entries`.
        let queued = (q.tail + q.entries - q.head) % q.entries;
        let moved = n.min(queued);
        self.iqh = (q.head + moved) % q.entries * q.desc_size;
        moved
    }

    /// IQT written (or QI enabled): check the tail and ask for processing.
    fn tail_written(&mut self, effects: &mut RegEffects) {
        let Some(q) = self.inv_queue() else {
            return;
        };
        let error = if q.desc_size == 32 && self.iqt & 0x10 != 0 {
            Some(Iqei::TailMisaligned)
        } else if q.tail >= q.entries {
            Some(Iqei::InvalidTail)
        } else {
            None
        };
        if let Some(iqei) = error {
            effects.extend(self.set_iqe(iqei).map(RegEffect::Interrupt));
        } else if self.next_inv_desc().is_some() {
            effects.push(RegEffect::ProcessInvalidationQueue);
        }
    }

    /// The page request queue, when the unit supports page requests (ECAP.PRS).
    pub fn page_request_queue(&self) -> Option<PageRequestQueue> {
        self.ecap.prs.then(|| PageRequestQueue {
            base: self.pqa & pq::PQA_BASE,
            entries: (4096 << (self.pqa & pq::PQA_PQS)) / pq::DESC_SIZE,
            head: self.pqh / pq::DESC_SIZE,
            tail: self.pqt / pq::DESC_SIZE,
        })
    }

    /// Where the next page request descriptor goes: the slot at PQT, if the queue is not
    /// full (§7.5.1).
    pub fn pq_tail_slot(&self) -> Option<u64> {
        let q = self.page_request_queue()?;
        let room = q.head < q.entries && q.tail < q.entries && (q.tail + 1) % q.entries != q.head;
        room.then_some(q.base + q.tail * pq::DESC_SIZE)
    }

    /// Publishes the descriptor written at [`Self::pq_tail_slot`]: advances PQT, sets
    /// PRS.PPR and raises a page request event if no page request status was set.
    pub fn pq_advance_tail(&mut self) -> Result<Option<Interrupt>, RegError> {
        self.pq_tail_slot().ok_or(RegError::PageRequestQueueFull)?;
        let q = self
            .page_request_queue()
            .ok_or(RegError::PageRequestQueueFull)?;
        self.pqt = (q.tail + 1) % q.entries * pq::DESC_SIZE;
        Ok(self.set_page_request_status(pq::PPR))
    }

    /// A page request found the queue full: sets PRS.PRO (the request is not queued).
    pub fn pq_overflow(&mut self) -> Option<Interrupt> {
        self.set_page_request_status(pq::PRO)
    }

    fn set_page_request_status(&mut self, bits: u32) -> Option<Interrupt> {
        let pending = self.status_pending(EventSource::PageRequest);
        self.prs |= bits;
        if pending {
            None
        } else {
            self.raise(EventSource::PageRequest)
        }
    }
}

#[cfg(test)]
mod tests;
