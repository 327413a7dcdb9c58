//! The SMMU's programming interface (IHI 0070 §6): register offsets and fields, the ID
//! registers of a [`Features`] set, the queue pointer arithmetic of §3.5, and a
//! [`RegisterFile`] that applies the access rules to software reads and writes and reports
//! what the owning model must do as [`RegEffect`]s. It reads no memory itself.
//!
//! Choices where the spec leaves one:
//! - Accesses are 4 or 8 bytes and naturally aligned; 8 bytes only to a 64-bit register.
//!   Offsets without an implemented register read 0 and ignore writes.
//! - Enables complete at once: CR0ACK and IRQ_CTRLACK follow CR0 and IRQ_CTRL on the write.
//! - Writes the spec makes CONSTRAINED UNPREDICTABLE are ignored: a queue's BASE while the
//!   queue is enabled, an SMMU-owned pointer (CMDQ_CONS, EVENTQ_PROD, PRIQ_PROD) while its
//!   queue is enabled, STRTAB_BASE/_CFG, CR1 and CR2 while SMMUEN is 1.
//! - GBPA takes a write only with Update set, and Update reads 0 once it has.

use crate::cmd::CmdError;
use crate::features::{Features, Httu, StallModel};
use crate::field::{bits, get, put};
use crate::lookup::{BadStreamTable, StreamTable};
use crate::walk::AddressSize;

/// Register offsets (§6.2); EVENTQ and PRIQ pointers are in page 1.
pub mod offset {
    /// SMMU_IDR0.
    pub const IDR0: u64 = 0x00;
    /// SMMU_IDR1.
    pub const IDR1: u64 = 0x04;
    /// SMMU_IDR2.
    pub const IDR2: u64 = 0x08;
    /// SMMU_IDR3.
    pub const IDR3: u64 = 0x0c;
    /// SMMU_IDR4.
    pub const IDR4: u64 = 0x10;
    /// SMMU_IDR5.
    pub const IDR5: u64 = 0x14;
    /// SMMU_IIDR: implementer and revision (reads 0 here: no implementer is named).
    pub const IIDR: u64 = 0x18;
    /// SMMU_AIDR: architecture revision (reads 0: SMMUv3.0).
    pub const AIDR: u64 = 0x1c;
    /// SMMU_CR0.
    pub const CR0: u64 = 0x20;
    /// SMMU_CR0ACK.
    pub const CR0ACK: u64 = 0x24;
    /// SMMU_CR1.
    pub const CR1: u64 = 0x28;
    /// SMMU_CR2.
    pub const CR2: u64 = 0x2c;
    /// SMMU_GBPA.
    pub const GBPA: u64 = 0x44;
    /// SMMU_IRQ_CTRL.
    pub const IRQ_CTRL: u64 = 0x50;
    /// SMMU_IRQ_CTRLACK.
    pub const IRQ_CTRLACK: u64 = 0x54;
    /// SMMU_GERROR.
    pub const GERROR: u64 = 0x60;
    /// SMMU_GERRORN.
    pub const GERRORN: u64 = 0x64;
    /// SMMU_GERROR_IRQ_CFG0 (64-bit): the MSI address.
    pub const GERROR_IRQ_CFG0: u64 = 0x68;
    /// SMMU_GERROR_IRQ_CFG1: the MSI data.
    pub const GERROR_IRQ_CFG1: u64 = 0x70;
    /// SMMU_GERROR_IRQ_CFG2: the MSI memory attributes (MemAttr, SH).
    pub const GERROR_IRQ_CFG2: u64 = 0x74;
    /// SMMU_STRTAB_BASE (64-bit).
    pub const STRTAB_BASE: u64 = 0x80;
    /// SMMU_STRTAB_BASE_CFG.
    pub const STRTAB_BASE_CFG: u64 = 0x88;
    /// SMMU_CMDQ_BASE (64-bit).
    pub const CMDQ_BASE: u64 = 0x90;
    /// SMMU_CMDQ_PROD.
    pub const CMDQ_PROD: u64 = 0x98;
    /// SMMU_CMDQ_CONS.
    pub const CMDQ_CONS: u64 = 0x9c;
    /// SMMU_EVENTQ_BASE (64-bit).
    pub const EVENTQ_BASE: u64 = 0xa0;
    /// SMMU_EVENTQ_IRQ_CFG0 (64-bit).
    pub const EVENTQ_IRQ_CFG0: u64 = 0xb0;
    /// SMMU_EVENTQ_IRQ_CFG1.
    pub const EVENTQ_IRQ_CFG1: u64 = 0xb8;
    /// SMMU_EVENTQ_IRQ_CFG2.
    pub const EVENTQ_IRQ_CFG2: u64 = 0xbc;
    /// SMMU_PRIQ_BASE (64-bit).
    pub const PRIQ_BASE: u64 = 0xc0;
    /// SMMU_PRIQ_IRQ_CFG0 (64-bit).
    pub const PRIQ_IRQ_CFG0: u64 = 0xd0;
    /// SMMU_PRIQ_IRQ_CFG1.
    pub const PRIQ_IRQ_CFG1: u64 = 0xd8;
    /// SMMU_PRIQ_IRQ_CFG2.
    pub const PRIQ_IRQ_CFG2: u64 = 0xdc;
    /// SMMU_EVENTQ_PROD (page 1).
    pub const EVENTQ_PROD: u64 = 0x1_00a8;
    /// SMMU_EVENTQ_CONS (page 1).
    pub const EVENTQ_CONS: u64 = 0x1_00ac;
    /// SMMU_PRIQ_PROD (page 1).
    pub const PRIQ_PROD: u64 = 0x1_00c8;
    /// SMMU_PRIQ_CONS (page 1).
    pub const PRIQ_CONS: u64 = 0x1_00cc;
    /// The size of the two register pages.
    pub const LIMIT: u64 = 0x2_0000;
}

/// CR0 / CR0ACK bits (§6.3).
pub mod cr0 {
    /// SMMUEN: translation enabled.
    pub const SMMUEN: u32 = 1 << 0;
    /// PRIQEN: PRI queue enabled.
    pub const PRIQEN: u32 = 1 << 1;
    /// EVENTQEN: event queue enabled.
    pub const EVENTQEN: u32 = 1 << 2;
    /// CMDQEN: command queue enabled.
    pub const CMDQEN: u32 = 1 << 3;
    /// ATSCHK: ATS translated traffic is checked against the STE.
    pub const ATSCHK: u32 = 1 << 4;
    /// `VMW[8:6]`: VMID wildcard.
    pub const VMW: u32 = 0x7 << 6;
}

/// GERROR / GERRORN bits (§6.3): an error is active while the two differ.
pub mod gerror {
    /// CMDQ_ERR: the command queue stopped on an error (CMDQ_CONS.ERR).
    pub const CMDQ_ERR: u32 = 1 << 0;
    /// EVENTQ_ABT_ERR: an event queue write aborted.
    pub const EVENTQ_ABT_ERR: u32 = 1 << 2;
    /// PRIQ_ABT_ERR: a PRI queue write aborted.
    pub const PRIQ_ABT_ERR: u32 = 1 << 3;
    /// MSI_CMDQ_ABT_ERR: a CMD_SYNC MSI write aborted.
    pub const MSI_CMDQ_ABT_ERR: u32 = 1 << 4;
    /// MSI_EVENTQ_ABT_ERR.
    pub const MSI_EVENTQ_ABT_ERR: u32 = 1 << 5;
    /// MSI_PRIQ_ABT_ERR.
    pub const MSI_PRIQ_ABT_ERR: u32 = 1 << 6;
    /// MSI_GERROR_ABT_ERR.
    pub const MSI_GERROR_ABT_ERR: u32 = 1 << 7;
    /// SFM_ERR: service failure mode.
    pub const SFM_ERR: u32 = 1 << 8;
}

/// IRQ_CTRL / IRQ_CTRLACK bits (§6.3).
pub mod irq_ctrl {
    /// GERROR_IRQEN.
    pub const GERROR_IRQEN: u32 = 1 << 0;
    /// PRIQ_IRQEN.
    pub const PRIQ_IRQEN: u32 = 1 << 1;
    /// EVENTQ_IRQEN.
    pub const EVENTQ_IRQEN: u32 = 1 << 2;
}

/// GBPA.Update (§6.3).
pub const GBPA_UPDATE: u32 = 1 << 31;
/// GBPA.ABORT: abort transactions while SMMUEN is 0.
pub const GBPA_ABORT: u32 = 1 << 20;
/// EVENTQ_PROD.OVFLG / PRIQ_PROD.OVFLG and their CONS.OVACKFLG (§6.3).
pub const OVERFLOW: u32 = 1 << 31;

/// A register file refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegError {
    /// Accesses are 4 or 8 bytes.
    #[error("register access of {0} bytes (only 4 and 8)")]
    Width(usize),
    /// Misaligned, outside the two pages, or 8 bytes to a 32-bit register.
    #[error("no {size}-byte register access at {offset:#x}")]
    Access {
        /// The byte offset.
        offset: u64,
        /// The access width in bytes.
        size: usize,
    },
    /// ID register values describing an SMMU vsva cannot model.
    #[error("unsupported SMMU: {0}")]
    Unsupported(&'static str),
}

impl Features {
    /// SMMU_IDR0 (§6.3): AArch64 tables, little-endian walks, coherent, MSIs, 2-level
    /// stream tables, and the features of `self`.
    pub fn idr0(&self) -> u32 {
        let flag = |b: bool, bit: u32| (b as u32) << bit;
        flag(self.s2p, 0)
            | flag(self.s1p, 1)
            | 2 << 2
            | 1 << 4
            | (self.httu.raw() as u32) << 6
            | flag(self.hyp, 9)
            | flag(self.ats, 10)
            | flag(self.ns1ats, 11)
            | flag(self.asid16, 12)
            | 1 << 13
            | flag(self.pri, 16)
            | flag(self.vmid16, 18)
            | flag(self.cd2l, 19)
            | 2 << 21
            | (self.stall_model.raw() as u32) << 24
            | 1 << 27
    }

    /// SMMU_IDR1 (§6.3) with queues of at most 2^`queue_log2` entries each.
    pub fn idr1(&self, queue_log2: [u8; 3]) -> u32 {
        let [cmdq, eventq, priq] = queue_log2.map(|q| q.min(19) as u32);
        self.sid_bits.min(32) as u32
            | (self.ssid_bits.min(20) as u32) << 6
            | priq << 11
            | eventq << 16
            | cmdq << 21
    }

    /// SMMU_IDR3 (§6.3): RIL.
    pub fn idr3(&self) -> u32 {
        (self.ril as u32) << 10
    }

    /// SMMU_IDR5 (§6.3): OAS and the granules (GRAN4K bit 4, GRAN16K bit 5, GRAN64K bit 6).
    pub fn idr5(&self) -> u32 {
        self.oas.raw() as u32 | 1 << 4 | (self.gran16k as u32) << 5 | (self.gran64k as u32) << 6
    }

    /// The features ID registers IDR0, IDR1, IDR3 and IDR5 describe, if vsva can model
    /// that SMMU (AArch64 tables, little-endian walks, the 4 KiB granule).
    pub fn from_idr(idr0: u32, idr1: u32, idr3: u32, idr5: u32) -> Result<Features, RegError> {
        let g = |v: u32, hi, lo| get(v as u64, hi, lo);
        if g(idr0, 3, 2) & 2 == 0 {
            return Err(RegError::Unsupported("no AArch64 tables (IDR0.TTF)"));
        }
        if g(idr0, 22, 21) == 3 {
            return Err(RegError::Unsupported(
                "big-endian walks only (IDR0.TTENDIAN)",
            ));
        }
        if idr5 & 1 << 4 == 0 {
            return Err(RegError::Unsupported("no 4 KiB granule (IDR5.GRAN4K)"));
        }
        Ok(Features {
            s2p: idr0 & 1 != 0,
            s1p: idr0 & 2 != 0,
            httu: Httu::from_bits(g(idr0, 7, 6)).ok_or(RegError::Unsupported("IDR0.HTTU"))?,
            hyp: idr0 & 1 << 9 != 0,
            ats: idr0 & 1 << 10 != 0,
            ns1ats: idr0 & 1 << 11 != 0,
            asid16: idr0 & 1 << 12 != 0,
            pri: idr0 & 1 << 16 != 0,
            vmid16: idr0 & 1 << 18 != 0,
            cd2l: idr0 & 1 << 19 != 0,
            stall_model: StallModel::from_bits(g(idr0, 25, 24))
                .ok_or(RegError::Unsupported("IDR0.STALL_MODEL"))?,
            sid_bits: g(idr1, 5, 0) as u8,
            ssid_bits: g(idr1, 10, 6) as u8,
            ril: idr3 & 1 << 10 != 0,
            oas: AddressSize::from_bits(g(idr5, 2, 0)).ok_or(RegError::Unsupported("IDR5.OAS"))?,
            gran16k: idr5 & 1 << 5 != 0,
            gran64k: idr5 & 1 << 6 != 0,
        })
    }
}

/// A circular queue as its BASE, PROD and CONS registers describe it (§3.5): the pointers
/// hold an index of LOG2SIZE bits and a wrap bit above it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Queue {
    /// The base address (bits 51:5 of the BASE register).
    pub base: u64,
    /// log2 of the number of entries (LOG2SIZE capped by the IDR1 maximum).
    pub log2size: u8,
    /// The producer pointer (index and wrap bit).
    pub prod: u32,
    /// The consumer pointer (index and wrap bit).
    pub cons: u32,
}

impl Queue {
    /// LOG2SIZE as the pointers can hold it: at most 19 (IDR1's largest queue).
    fn bits(&self) -> u32 {
        self.log2size.min(19) as u32
    }

    fn mask(&self) -> u32 {
        (2 << self.bits()) - 1
    }

    /// Whether no entry waits.
    pub fn is_empty(&self) -> bool {
        self.prod & self.mask() == self.cons & self.mask()
    }

    /// Whether every entry waits: same index, different wrap bits.
    pub fn is_full(&self) -> bool {
        (self.prod ^ self.cons) & self.mask() == 1 << self.bits()
    }

    /// The pointer after `ptr` (the wrap bit flips when the index wraps).
    pub fn next(&self, ptr: u32) -> u32 {
        (ptr & self.mask()).wrapping_add(1) & self.mask()
    }

    /// The address of the entry `ptr` points to, for entries of `entry_bytes`.
    pub fn entry_address(&self, ptr: u32, entry_bytes: u64) -> u64 {
        let index = (ptr & ((1 << self.bits()) - 1)) as u64;
        self.base.wrapping_add(index.wrapping_mul(entry_bytes))
    }
}

/// What the owner of a register file must do after a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RegEffect {
    /// Nothing.
    None,
    /// CR0 changed from `old` to `new` (CR0ACK already shows `new`).
    Cr0 {
        /// CR0 before the write.
        old: u32,
        /// CR0 after it.
        new: u32,
    },
    /// Software wrote CMDQ_PROD: consume commands if the queue is enabled.
    CmdqProd,
    /// Software wrote EVENTQ_CONS or PRIQ_CONS: space was freed.
    QueueConsumed,
    /// A configuration register changed (STRTAB_BASE/_CFG, GBPA, CR1, CR2).
    Config,
}

/// The SMMU's registers as a state machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisterFile {
    features: Features,
    queue_log2: [u8; 3],
    cr0: u32,
    cr1: u32,
    cr2: u32,
    gbpa: u32,
    irq_ctrl: u32,
    gerror: u32,
    gerrorn: u32,
    strtab_base: u64,
    strtab_base_cfg: u32,
    /// BASE, PROD, CONS of the command, event and PRI queues.
    queues: [(u64, u32, u32); 3],
    /// IRQ_CFG0 (address), IRQ_CFG1 (data), IRQ_CFG2 (attributes) of GERROR, EVENTQ, PRIQ.
    irq_cfg: [(u64, u32, u32); 3],
}

/// The SMMU's interrupt sources (§6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Irq {
    /// Global errors.
    Gerror,
    /// The event queue.
    Eventq,
    /// The PRI queue.
    Priq,
}

/// An interrupt's MSI write, from its IRQ_CFG0/1/2 registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Msi {
    /// The address (bits 51:2); 0 means a wired interrupt instead.
    pub addr: u64,
    /// The data written.
    pub data: u32,
    /// MemAttr (bits 3:0) and SH (bits 5:4) of the write.
    pub attr: u32,
}

const CMDQ: usize = 0;
const EVENTQ: usize = 1;
const PRIQ: usize = 2;

impl RegisterFile {
    /// The reset state of an SMMU with `features` and queues of at most 2^`queue_log2`
    /// entries (command, event, PRI): everything disabled, GBPA aborting.
    pub fn new(features: Features, queue_log2: [u8; 3]) -> Self {
        RegisterFile {
            features,
            queue_log2: queue_log2.map(|q| q.min(19)),
            cr0: 0,
            cr1: 0,
            cr2: 0,
            gbpa: GBPA_ABORT,
            irq_ctrl: 0,
            gerror: 0,
            gerrorn: 0,
            strtab_base: 0,
            strtab_base_cfg: 0,
            queues: [(0, 0, 0); 3],
            irq_cfg: [(0, 0, 0); 3],
        }
    }

    /// The MSI that signals `irq`.
    pub fn msi(&self, irq: Irq) -> Msi {
        let (addr, data, attr) = self.irq_cfg[irq as usize];
        Msi { addr, data, attr }
    }

    /// The features the ID registers report.
    pub fn features(&self) -> &Features {
        &self.features
    }

    /// CR0ACK (which equals CR0).
    pub fn cr0ack(&self) -> u32 {
        self.cr0
    }

    /// The active global errors: GERROR ^ GERRORN.
    pub fn active_gerrors(&self) -> u32 {
        self.gerror ^ self.gerrorn
    }

    /// Activates the global error `bit` (a [`gerror`] bit) by toggling it in GERROR, unless
    /// it is active already (§6.3.17: an error stays active, and is not raised again, until
    /// software acknowledges it in GERRORN). Returns whether it became active.
    pub fn activate_gerror(&mut self, bit: u32) -> bool {
        if self.active_gerrors() & bit != 0 {
            return false;
        }
        self.gerror ^= bit;
        true
    }

    /// STRTAB_BASE and STRTAB_BASE_CFG.
    pub fn strtab(&self) -> (u64, u32) {
        (self.strtab_base, self.strtab_base_cfg)
    }

    /// The stream table STRTAB_BASE and STRTAB_BASE_CFG describe: FMT 0 linear, 1 2-level
    /// with SPLIT, LOG2SIZE entries (capped by SIDSIZE). A reserved FMT or SPLIT is refused.
    pub fn stream_table(&self) -> Result<StreamTable, BadStreamTable> {
        let cfg = self.strtab_base_cfg as u64;
        let split = match get(cfg, 17, 16) {
            0 => None,
            1 => Some(get(cfg, 10, 6) as u8),
            fmt => return Err(BadStreamTable::Format(fmt as u8)),
        };
        StreamTable::new(
            self.strtab_base,
            get(cfg, 5, 0) as u8,
            split,
            &self.features,
        )
    }

    fn queue(&self, q: usize) -> Queue {
        let (base, prod, cons) = self.queues[q];
        let log2size = (get(base, 4, 0) as u8).min(self.queue_log2[q]);
        let ptr_mask = (2u32 << log2size) - 1;
        Queue {
            base: base & bits(51, 5),
            log2size,
            prod: prod & ptr_mask,
            cons: cons & ptr_mask,
        }
    }

    /// The command queue.
    pub fn cmdq(&self) -> Queue {
        self.queue(CMDQ)
    }

    /// The command queue if the SMMU consumes it now: CMDQEN acknowledged in CR0ACK and no
    /// CMDQ_ERR active (§3.5.2, §6.3.17: the queue stops at an error until it is
    /// acknowledged).
    pub fn cmdq_to_consume(&self) -> Option<Queue> {
        let enabled =
            self.cr0ack() & cr0::CMDQEN != 0 && self.active_gerrors() & gerror::CMDQ_ERR == 0;
        enabled.then(|| self.cmdq())
    }

    /// The event queue.
    pub fn eventq(&self) -> Queue {
        self.queue(EVENTQ)
    }

    /// The PRI queue.
    pub fn priq(&self) -> Queue {
        self.queue(PRIQ)
    }

    /// The interrupt whose IRQ_CFG0 is at `cfg0`.
    fn irq_of(cfg0: u64) -> usize {
        match cfg0 {
            offset::GERROR_IRQ_CFG0 => Irq::Gerror as usize,
            offset::EVENTQ_IRQ_CFG0 => Irq::Eventq as usize,
            _ => Irq::Priq as usize,
        }
    }

    fn enable_bit(q: usize) -> u32 {
        [cr0::CMDQEN, cr0::EVENTQEN, cr0::PRIQEN][q]
    }

    fn readable(&self, offset: u64) -> Option<(u64, bool)> {
        use offset::*;
        let (cmdq, eventq, priq) = (self.queues[CMDQ], self.queues[EVENTQ], self.queues[PRIQ]);
        let idr1 = self.features.idr1(self.queue_log2) as u64;
        // (value, 64-bit register)
        Some(match offset {
            IDR0 => (self.features.idr0() as u64, false),
            IDR1 => (idr1, false),
            IDR3 => (self.features.idr3() as u64, false),
            IDR5 => (self.features.idr5() as u64, false),
            IDR2 | IDR4 => (0, false),
            CR0 | CR0ACK => (self.cr0 as u64, false),
            CR1 => (self.cr1 as u64, false),
            CR2 => (self.cr2 as u64, false),
            GBPA => (self.gbpa as u64, false),
            IRQ_CTRL | IRQ_CTRLACK => (self.irq_ctrl as u64, false),
            GERROR => (self.gerror as u64, false),
            GERRORN => (self.gerrorn as u64, false),
            GERROR_IRQ_CFG0 => (self.irq_cfg[0].0, true),
            GERROR_IRQ_CFG1 => (self.irq_cfg[0].1 as u64, false),
            GERROR_IRQ_CFG2 => (self.irq_cfg[0].2 as u64, false),
            STRTAB_BASE => (self.strtab_base, true),
            STRTAB_BASE_CFG => (self.strtab_base_cfg as u64, false),
            CMDQ_BASE => (cmdq.0, true),
            CMDQ_PROD => (cmdq.1 as u64, false),
            CMDQ_CONS => (cmdq.2 as u64, false),
            EVENTQ_BASE => (eventq.0, true),
            EVENTQ_IRQ_CFG0 => (self.irq_cfg[1].0, true),
            EVENTQ_IRQ_CFG1 => (self.irq_cfg[1].1 as u64, false),
            EVENTQ_IRQ_CFG2 => (self.irq_cfg[1].2 as u64, false),
            EVENTQ_PROD => (eventq.1 as u64, false),
            EVENTQ_CONS => (eventq.2 as u64, false),
            PRIQ_BASE => (priq.0, true),
            PRIQ_IRQ_CFG0 => (self.irq_cfg[2].0, true),
            PRIQ_IRQ_CFG1 => (self.irq_cfg[2].1 as u64, false),
            PRIQ_IRQ_CFG2 => (self.irq_cfg[2].2 as u64, false),
            PRIQ_PROD => (priq.1 as u64, false),
            PRIQ_CONS => (priq.2 as u64, false),
            _ => return None,
        })
    }

    /// The register (or half of a 64-bit register) at `offset`, and whether it is 64 bits.
    fn locate(&self, offset: u64, size: usize) -> Result<(u64, u32, bool), RegError> {
        let bad = RegError::Access { offset, size };
        if size != 4 && size != 8 {
            return Err(RegError::Width(size));
        }
        if offset % size as u64 != 0 || offset >= offset::LIMIT {
            return Err(bad);
        }
        if let Some((_, wide)) = self.readable(offset) {
            if size == 8 && !wide {
                return Err(bad);
            }
            return Ok((offset, 0, wide));
        }
        // The upper half of a 64-bit register.
        match self.readable(offset - 4) {
            Some((_, true)) if size == 4 && offset % 8 == 4 => Ok((offset - 4, 32, true)),
            _ if size == 4 => Ok((offset, 0, false)),
            _ => Err(bad),
        }
    }

    /// A software read of `size` bytes at `offset`.
    pub fn read(&self, offset: u64, size: usize) -> Result<u64, RegError> {
        let (reg, shift, _) = self.locate(offset, size)?;
        let value = self.readable(reg).map_or(0, |(v, _)| v) >> shift;
        Ok(if size == 4 {
            value & 0xffff_ffff
        } else {
            value
        })
    }

    /// A software write of `size` bytes at `offset`.
    pub fn write(&mut self, offset: u64, size: usize, value: u64) -> Result<RegEffect, RegError> {
        use offset::*;
        let (reg, shift, wide) = self.locate(offset, size)?;
        if size == 4 && value >> 32 != 0 {
            return Err(RegError::Access { offset, size });
        }
        // The new value of a 64-bit register written in halves.
        let merged = |old: u64| {
            if !wide || size == 8 {
                value
            } else {
                (old & !(0xffff_ffff << shift)) | value << shift
            }
        };
        let v32 = value as u32;
        let smmu_enabled = self.cr0 & cr0::SMMUEN != 0;
        Ok(match reg {
            CR0 => {
                let old = self.cr0;
                self.cr0 = v32
                    & (cr0::SMMUEN
                        | cr0::PRIQEN
                        | cr0::EVENTQEN
                        | cr0::CMDQEN
                        | cr0::ATSCHK
                        | cr0::VMW);
                RegEffect::Cr0 { old, new: self.cr0 }
            }
            CR1 | CR2 if smmu_enabled => RegEffect::None,
            CR1 => {
                self.cr1 = v32 & bits(11, 0) as u32;
                RegEffect::Config
            }
            CR2 => {
                self.cr2 = v32 & 0x7;
                RegEffect::Config
            }
            GBPA if v32 & GBPA_UPDATE != 0 => {
                self.gbpa =
                    v32 & (bits(3, 0) | 1 << 4 | bits(11, 8) | bits(13, 12) | bits(20, 16)) as u32;
                RegEffect::Config
            }
            IRQ_CTRL => {
                self.irq_ctrl = v32 & 0x7;
                RegEffect::None
            }
            GERRORN => {
                self.gerrorn = v32 & bits(8, 0) as u32 & !0x2;
                RegEffect::None
            }
            GERROR_IRQ_CFG0 | EVENTQ_IRQ_CFG0 | PRIQ_IRQ_CFG0 => {
                let cfg = &mut self.irq_cfg[Self::irq_of(reg)];
                cfg.0 = merged(cfg.0) & bits(51, 2);
                RegEffect::None
            }
            GERROR_IRQ_CFG1 | EVENTQ_IRQ_CFG1 | PRIQ_IRQ_CFG1 => {
                self.irq_cfg[Self::irq_of(reg - 8)].1 = v32;
                RegEffect::None
            }
            GERROR_IRQ_CFG2 | EVENTQ_IRQ_CFG2 | PRIQ_IRQ_CFG2 => {
                self.irq_cfg[Self::irq_of(reg - 0xc)].2 = v32 & 0x3f;
                RegEffect::None
            }
            STRTAB_BASE | STRTAB_BASE_CFG if smmu_enabled => RegEffect::None,
            STRTAB_BASE => {
                self.strtab_base = merged(self.strtab_base) & (1 << 62 | bits(51, 6));
                RegEffect::Config
            }
            STRTAB_BASE_CFG => {
                self.strtab_base_cfg = v32 & (bits(5, 0) | bits(10, 6) | bits(17, 16)) as u32;
                RegEffect::Config
            }
            CMDQ_BASE | EVENTQ_BASE | PRIQ_BASE => {
                let q = match reg {
                    CMDQ_BASE => CMDQ,
                    EVENTQ_BASE => EVENTQ,
                    _ => PRIQ,
                };
                if self.cr0 & Self::enable_bit(q) == 0 {
                    self.queues[q].0 =
                        merged(self.queues[q].0) & (1 << 62 | bits(51, 5) | bits(4, 0));
                }
                RegEffect::None
            }
            CMDQ_PROD => {
                self.queues[CMDQ].1 = v32 & bits(19, 0) as u32;
                RegEffect::CmdqProd
            }
            CMDQ_CONS => {
                if self.cr0 & cr0::CMDQEN == 0 {
                    self.queues[CMDQ].2 = v32 & bits(19, 0) as u32;
                }
                RegEffect::None
            }
            EVENTQ_PROD | PRIQ_PROD => {
                let q = if reg == EVENTQ_PROD { EVENTQ } else { PRIQ };
                if self.cr0 & Self::enable_bit(q) == 0 {
                    self.queues[q].1 = v32 & (bits(19, 0) as u32 | OVERFLOW);
                }
                RegEffect::None
            }
            EVENTQ_CONS | PRIQ_CONS => {
                let q = if reg == EVENTQ_CONS { EVENTQ } else { PRIQ };
                self.queues[q].2 = v32 & (bits(19, 0) as u32 | OVERFLOW);
                RegEffect::QueueConsumed
            }
            _ => RegEffect::None,
        })
    }

    /// The SMMU consumed commands up to `cons`; with `error`, it stopped at the command
    /// `cons` points to, recorded CMDQ_CONS.ERR and activated GERROR.CMDQ_ERR.
    pub fn cmdq_consumed(&mut self, cons: u32, error: Option<CmdError>) {
        let q = self.cmdq();
        let ptr = cons & ((2 << q.log2size) - 1);
        let err = error.map_or(0, |e| put(e.code() as u64, 30, 24) as u32);
        self.queues[CMDQ].2 = ptr | err;
        if error.is_some() {
            self.activate_gerror(gerror::CMDQ_ERR);
        }
    }

    fn produce(&mut self, q: usize, entry_bytes: u64) -> Option<u64> {
        if self.cr0 & Self::enable_bit(q) == 0 {
            return None;
        }
        let queue = self.queue(q);
        let (_, prod, cons) = self.queues[q];
        if queue.is_full() {
            // Overflow: OVFLG differs from CONS.OVACKFLG until software acknowledges it.
            self.queues[q].1 = (prod & !OVERFLOW) | (!cons & OVERFLOW);
            return None;
        }
        let addr = queue.entry_address(queue.prod, entry_bytes);
        self.queues[q].1 = (prod & OVERFLOW) | queue.next(queue.prod);
        Some(addr)
    }

    /// Claims the next event queue slot: the address to write a 32-byte record to, with
    /// EVENTQ_PROD already advanced; `None` when the queue is disabled, or full (then the
    /// overflow flag is set and the event lost).
    pub fn push_event(&mut self) -> Option<u64> {
        self.produce(EVENTQ, 32)
    }

    /// Claims the next PRI queue slot (16 bytes), as [`RegisterFile::push_event`] does.
    pub fn push_page_request(&mut self) -> Option<u64> {
        self.produce(PRIQ, 16)
    }

    /// Events were lost before reaching the event queue (§7.4: the queue's overflow
    /// condition): EVENTQ_PROD.OVFLG toggled to differ from EVENTQ_CONS.OVACKFLG, unless an
    /// overflow is unacknowledged already. Whether the flag changed (false also while the
    /// queue is disabled, which records nothing).
    pub fn eventq_overflow(&mut self) -> bool {
        if self.cr0 & Self::enable_bit(EVENTQ) == 0 || self.eventq_overflowed() {
            return false;
        }
        let (_, prod, cons) = self.queues[EVENTQ];
        self.queues[EVENTQ].1 = (prod & !OVERFLOW) | (!cons & OVERFLOW);
        true
    }

    /// Whether an overflow of the event queue is unacknowledged.
    pub fn eventq_overflowed(&self) -> bool {
        (self.queues[EVENTQ].1 ^ self.queues[EVENTQ].2) & OVERFLOW != 0
    }
}

#[cfg(test)]
mod tests {
    use super::offset::*;
    use super::*;

    const F: Features = Features::VSVA;

    fn regs() -> RegisterFile {
        RegisterFile::new(F, [8, 7, 6])
    }

    #[test]
    fn id_registers() {
        assert_eq!(F.idr0(), 0x094d_349b);
        assert_eq!(F.idr1([8, 7, 6]), 0x0107_3510);
        assert_eq!(F.idr5(), 0x75);
        let r = regs();
        assert_eq!(r.read(IDR0, 4), Ok(0x094d_349b));
        assert_eq!(r.read(IDR1, 4), Ok(0x0107_3510));
        for f in [
            F,
            Features {
                s1p: false,
                httu: Httu::None,
                ril: true,
                oas: AddressSize::Bits40,
                ..F
            },
            Features {
                hyp: true,
                cd2l: false,
                stall_model: StallModel::ForceStall,
                ssid_bits: 0,
                ..F
            },
        ] {
            assert_eq!(
                Features::from_idr(f.idr0(), f.idr1([8, 8, 8]), f.idr3(), f.idr5()),
                Ok(f)
            );
        }
        assert!(Features::from_idr(F.idr0() & !(3 << 2), F.idr1([8; 3]), 0, F.idr5()).is_err());
        assert!(Features::from_idr(F.idr0(), F.idr1([8; 3]), 0, 5).is_err());
        // IDRs ignore writes.
        let mut r = regs();
        assert_eq!(r.write(IDR0, 4, 0), Ok(RegEffect::None));
        assert_eq!(r.read(IDR0, 4), Ok(F.idr0() as u64));
    }

    #[test]
    fn queue_pointer_arithmetic() {
        let q = Queue {
            base: 0x1000,
            log2size: 2,
            prod: 0b011,
            cons: 0b111,
        };
        assert!(q.is_full() && !q.is_empty());
        assert_eq!(q.next(0b011), 0b100);
        assert_eq!(q.next(0b111), 0b000);
        assert_eq!(q.entry_address(0b110, 16), 0x1000 + 2 * 16);
        let e = Queue {
            prod: 0b101,
            cons: 0b101,
            ..q
        };
        assert!(e.is_empty() && !e.is_full());
        // A LOG2SIZE beyond what the pointers can hold acts as 19, without overflow.
        let huge = Queue {
            log2size: 200,
            prod: 1 << 19,
            cons: 0,
            ..q
        };
        assert!(huge.is_full());
        assert_eq!(huge.next((1 << 20) - 1), 0);
        assert_eq!(huge.entry_address(3, 32), 0x1000 + 96);
    }

    #[test]
    fn access_rules() {
        let mut r = regs();
        assert_eq!(r.read(CR0, 2), Err(RegError::Width(2)));
        assert_eq!(
            r.read(CR0 + 2, 4),
            Err(RegError::Access {
                offset: CR0 + 2,
                size: 4
            })
        );
        assert_eq!(
            r.read(CR0, 8),
            Err(RegError::Access {
                offset: CR0,
                size: 8
            })
        );
        assert_eq!(
            r.read(LIMIT, 4),
            Err(RegError::Access {
                offset: LIMIT,
                size: 4
            })
        );
        assert_eq!(
            r.write(CR1, 4, 1 << 32),
            Err(RegError::Access {
                offset: CR1,
                size: 4
            })
        );
        // 64-bit registers in one access or two halves.
        r.write(STRTAB_BASE, 8, 0x0000_0012_3456_7840).unwrap();
        assert_eq!(r.read(STRTAB_BASE + 4, 4), Ok(0x12));
        r.write(STRTAB_BASE + 4, 4, 0x34).unwrap();
        assert_eq!(r.read(STRTAB_BASE, 8), Ok(0x0000_0034_3456_7840));
        // RES0 bits of STRTAB_BASE are dropped.
        r.write(STRTAB_BASE, 8, u64::MAX).unwrap();
        assert_eq!(r.read(STRTAB_BASE, 8), Ok(1 << 62 | bits(51, 6)));
        // Unimplemented offsets read 0.
        assert_eq!(r.read(0x18, 4), Ok(0));
        // The MSI of each interrupt.
        r.write(EVENTQ_IRQ_CFG0, 8, 0x0000_0008_fee0_0003).unwrap();
        r.write(EVENTQ_IRQ_CFG1, 4, 0x41).unwrap();
        r.write(EVENTQ_IRQ_CFG2, 4, 0xff).unwrap();
        r.write(GERROR_IRQ_CFG1, 4, 7).unwrap();
        assert_eq!(
            r.msi(Irq::Eventq),
            Msi {
                addr: 0x8_fee0_0000,
                data: 0x41,
                attr: 0x3f
            }
        );
        assert_eq!(
            r.msi(Irq::Gerror),
            Msi {
                addr: 0,
                data: 7,
                attr: 0
            }
        );
        assert_eq!(r.read(EVENTQ_IRQ_CFG2, 4), Ok(0x3f));
        assert_eq!(r.read(PRIQ_IRQ_CFG1, 4), Ok(0));
    }

    #[test]
    fn enables_and_ignored_writes() {
        let mut r = regs();
        r.write(CMDQ_BASE, 8, 0x8_0000 | 5).unwrap();
        r.write(STRTAB_BASE_CFG, 4, 1 << 16 | 8 << 6 | 16).unwrap();
        let en = cr0::SMMUEN | cr0::CMDQEN;
        assert_eq!(
            r.write(CR0, 4, en as u64),
            Ok(RegEffect::Cr0 { old: 0, new: en })
        );
        assert_eq!(r.read(CR0ACK, 4), Ok(en as u64));
        // The enabled queue's BASE and CONS, and the stream table, ignore writes now.
        r.write(CMDQ_BASE, 8, 0x9_0000).unwrap();
        r.write(CMDQ_CONS, 4, 3).unwrap();
        r.write(STRTAB_BASE_CFG, 4, 0).unwrap();
        assert_eq!(
            r.cmdq(),
            Queue {
                base: 0x8_0000,
                log2size: 5,
                prod: 0,
                cons: 0
            }
        );
        assert_eq!(r.strtab().1, 1 << 16 | 8 << 6 | 16);
        assert_eq!(r.stream_table(), StreamTable::new(0, 16, Some(8), &F));
        assert_eq!(r.write(CMDQ_PROD, 4, 2), Ok(RegEffect::CmdqProd));
        assert_eq!(r.cmdq().prod, 2);
        // LOG2SIZE is capped by IDR1.CMDQS.
        let mut big = regs();
        big.write(CMDQ_BASE, 8, 0x8_0000 | 31).unwrap();
        assert_eq!(big.cmdq().log2size, 8);
        // IRQ_CTRLACK follows IRQ_CTRL; GBPA needs Update.
        r.write(IRQ_CTRL, 4, 0x7).unwrap();
        assert_eq!(r.read(IRQ_CTRLACK, 4), Ok(0x7));
        assert_eq!(r.read(GBPA, 4), Ok(GBPA_ABORT as u64));
        r.write(GBPA, 4, 0).unwrap();
        assert_eq!(r.read(GBPA, 4), Ok(GBPA_ABORT as u64));
        r.write(GBPA, 4, (GBPA_UPDATE | 1 << 12) as u64).unwrap();
        assert_eq!(r.read(GBPA, 4), Ok(1 << 12));
        // CR1 is ignored while SMMUEN is set.
        r.write(CR1, 4, 0x3f).unwrap();
        assert_eq!(r.read(CR1, 4), Ok(0));
    }

    #[test]
    fn command_errors() {
        let mut r = regs();
        r.write(CMDQ_BASE, 8, 0x8_0000 | 3).unwrap();
        r.write(CR0, 4, cr0::CMDQEN as u64).unwrap();
        r.write(CMDQ_PROD, 4, 5).unwrap();
        r.cmdq_consumed(2, Some(CmdError::Ill));
        assert_eq!(r.read(CMDQ_CONS, 4), Ok(1 << 24 | 2));
        assert_eq!(r.active_gerrors(), gerror::CMDQ_ERR);
        assert_eq!(r.read(GERROR, 4), Ok(1));
        // Software acknowledges by writing GERRORN = GERROR.
        r.write(GERRORN, 4, 1).unwrap();
        assert_eq!(r.active_gerrors(), 0);
        // A later error toggles GERROR again.
        r.cmdq_consumed(3, Some(CmdError::Abt));
        assert_eq!(r.read(GERROR, 4), Ok(0));
        assert_eq!(r.active_gerrors(), gerror::CMDQ_ERR);
        r.cmdq_consumed(5, None);
        assert_eq!(r.read(CMDQ_CONS, 4), Ok(5));
    }

    #[test]
    fn an_active_global_error_is_not_raised_again_until_acknowledged() {
        let mut r = regs();
        assert!(r.activate_gerror(gerror::MSI_EVENTQ_ABT_ERR));
        assert!(!r.activate_gerror(gerror::MSI_EVENTQ_ABT_ERR));
        assert_eq!(r.read(GERROR, 4), Ok(gerror::MSI_EVENTQ_ABT_ERR as u64));
        assert!(r.activate_gerror(gerror::EVENTQ_ABT_ERR));
        assert_eq!(
            r.active_gerrors(),
            gerror::MSI_EVENTQ_ABT_ERR | gerror::EVENTQ_ABT_ERR
        );
        // Acknowledging one leaves the other active; the acknowledged one can come back.
        r.write(GERRORN, 4, gerror::MSI_EVENTQ_ABT_ERR as u64)
            .unwrap();
        assert_eq!(r.active_gerrors(), gerror::EVENTQ_ABT_ERR);
        assert!(r.activate_gerror(gerror::MSI_EVENTQ_ABT_ERR));
        assert_eq!(r.read(GERROR, 4), Ok(gerror::EVENTQ_ABT_ERR as u64));
    }

    #[test]
    fn event_queue_fills_and_overflows() {
        let mut r = regs();
        r.write(EVENTQ_BASE, 8, 0x4_0000 | 2).unwrap();
        assert_eq!(r.push_event(), None, "disabled");
        r.write(CR0, 4, cr0::EVENTQEN as u64).unwrap();
        let slots: Vec<Option<u64>> = (0..4).map(|_| r.push_event()).collect();
        assert_eq!(
            slots,
            [
                Some(0x4_0000),
                Some(0x4_0020),
                Some(0x4_0040),
                Some(0x4_0060)
            ]
        );
        assert!(r.eventq().is_full());
        assert!(!r.eventq_overflowed());
        assert_eq!(r.push_event(), None);
        assert!(r.eventq_overflowed());
        assert_eq!(r.read(EVENTQ_PROD, 4), Ok((OVERFLOW | 0b100) as u64));
        // Software consumes two and acknowledges the overflow.
        assert_eq!(
            r.write(EVENTQ_CONS, 4, (OVERFLOW | 2) as u64),
            Ok(RegEffect::QueueConsumed)
        );
        assert!(!r.eventq_overflowed());
        assert_eq!(r.push_event(), Some(0x4_0000));
        assert_eq!(r.eventq().prod, 0b101);
        // Events lost elsewhere: the same overflow flag, once until acknowledged, PROD's
        // index kept.
        assert!(r.eventq_overflow());
        assert!(r.eventq_overflowed());
        assert!(!r.eventq_overflow());
        assert_eq!(r.read(EVENTQ_PROD, 4), Ok(0b101));
        r.write(EVENTQ_CONS, 4, 1).unwrap();
        assert!(!r.eventq_overflowed());
        assert!(r.eventq_overflow());
        assert_eq!(r.read(EVENTQ_PROD, 4), Ok((OVERFLOW | 0b101) as u64));
        // The PRI queue has 16-byte entries.
        r.write(PRIQ_BASE, 8, 0x5_0000 | 4).unwrap();
        r.write(CR0, 4, (cr0::EVENTQEN | cr0::PRIQEN) as u64)
            .unwrap();
        assert_eq!(r.push_page_request(), Some(0x5_0000));
        assert_eq!(r.push_page_request(), Some(0x5_0010));
    }
}
