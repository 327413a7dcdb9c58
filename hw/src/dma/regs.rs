//! The engine's MMIO registers (BAR 0) and submission portal (BAR 2).
//!
//! A reduced DSA-style register file: capabilities, a control register that also carries
//! the PCIe PASID, ATS and PRI capability enables, a status register with the PRI status
//! bits, and a software error register for errors no completion record can report. All
//! registers are 64 bits wide and accessed 64 bits at a time.

use vsva_vtd::{addr::Pasid, addr::SourceId};

use super::descriptor::CompletionStatus;
use super::port::{AtsCapability, PcieCapabilities};

/// Capabilities (read-only).
pub const REG_CAP: u64 = 0x00;
/// Control (read-write; configuration bits change only while the engine is disabled).
pub const REG_CTRL: u64 = 0x08;
/// Status (read-only; the PRI bits are write-1-to-clear).
pub const REG_STATUS: u64 = 0x10;
/// Software error, first half: valid, overflow, status, opcode, PASID.
pub const REG_SWERR0: u64 = 0x20;
/// Software error, second half: the address involved.
pub const REG_SWERR1: u64 = 0x28;

/// CAP: requests with PASID supported (PCIe PASID capability).
pub const CAP_PASID: u64 = 1 << 0;
/// CAP: ATS and a device TLB.
pub const CAP_ATS: u64 = 1 << 1;
/// CAP: PRI page requests; also block-on-fault descriptors.
pub const CAP_PRS: u64 = 1 << 2;
/// CAP: shift of the PASID width field (bits 15:8).
pub const CAP_PASID_WIDTH_SHIFT: u32 = 8;
/// CAP: shift of log2 of the maximum transfer size (bits 23:16).
pub const CAP_MAX_XFER_SHIFT: u32 = 16;
/// CAP: shift of the work queue size (bits 47:32).
pub const CAP_WQ_SIZE_SHIFT: u32 = 32;
/// CAP: shift of the outstanding page request capacity (bits 63:48).
pub const CAP_PRI_CAPACITY_SHIFT: u32 = 48;

/// CTRL: engine enabled; descriptors are accepted and executed.
pub const CTRL_ENABLE: u64 = 1 << 0;
/// CTRL: PASID Enable (PCIe PASID control).
pub const CTRL_PASID_EN: u64 = 1 << 1;
/// CTRL: Privileged Mode Enable (PCIe PASID control).
pub const CTRL_PRIV_EN: u64 = 1 << 2;
/// CTRL: ATS Enable (PCIe ATS control); the device TLB is used.
pub const CTRL_ATS_EN: u64 = 1 << 3;
/// CTRL: PRI Enable (PCIe PRI control).
pub const CTRL_PRI_EN: u64 = 1 << 4;
/// Every CTRL bit.
pub const CTRL_ALL: u64 = CTRL_ENABLE | CTRL_PASID_EN | CTRL_PRIV_EN | CTRL_ATS_EN | CTRL_PRI_EN;

/// STATUS: the engine is enabled.
pub const STATUS_ENABLED: u64 = 1 << 0;
/// STATUS: a PRG response said Response Failure; no page requests until cleared (PCIe PRI
/// status RF, write 1 to clear).
pub const STATUS_PRI_RF: u64 = 1 << 1;
/// STATUS: a PRG response named no outstanding group (PCIe PRI status UPRGI, write 1 to
/// clear).
pub const STATUS_PRI_UPRGI: u64 = 1 << 2;

/// SWERR0: the register holds an error (write 1 to clear, which clears the record).
pub const SWERR_VALID: u64 = 1 << 0;
/// SWERR0: another error arrived while one was held (write 1 to clear).
pub const SWERR_OVERFLOW: u64 = 1 << 1;

/// Size of the submission portal: any 64-byte aligned 64-byte write inside it submits.
pub const PORTAL_SIZE: u64 = 0x1000;

/// The engine's fixed configuration: what it is built with, reflected in CAP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaEngineConfig {
    /// The requester id of the engine.
    pub sid: SourceId,
    /// Requests with PASID supported (CAP.PASID).
    pub pasid: bool,
    /// Max PASID Width of the PASID capability (1 to 20 bits; CAP's PASID width).
    pub pasid_width: u8,
    /// ATS and a device TLB (CAP.ATS).
    pub ats: bool,
    /// Invalidate Queue Depth of the ATS capability (PCIe ATS Capability register bits
    /// 4:0; 0 means 32).
    pub ats_queue_depth: u8,
    /// PRI page requests and block-on-fault descriptors (CAP.PRS).
    pub prs: bool,
    /// Descriptors the work queue holds (1 to 65535).
    pub wq_size: u16,
    /// Device TLB entries.
    pub devtlb_entries: usize,
    /// log2 of the largest transfer size (12 to 31).
    pub max_transfer_shift: u8,
    /// Page requests outstanding at once (1 to 512).
    pub pri_capacity: u16,
}

impl DmaEngineConfig {
    /// An engine with every capability and DSA-like sizes.
    pub const fn new(sid: SourceId) -> Self {
        DmaEngineConfig {
            sid,
            pasid: true,
            pasid_width: Pasid::BITS as u8,
            ats: true,
            ats_queue_depth: 0,
            prs: true,
            wq_size: 128,
            devtlb_entries: 64,
            max_transfer_shift: 31,
            pri_capacity: 32,
        }
    }

    /// The CAP register.
    pub const fn cap(&self) -> u64 {
        let mut cap = (self.max_transfer_shift as u64) << CAP_MAX_XFER_SHIFT
            | (self.wq_size as u64) << CAP_WQ_SIZE_SHIFT;
        if self.pasid {
            cap |= CAP_PASID | (self.pasid_width as u64) << CAP_PASID_WIDTH_SHIFT;
        }
        if self.ats {
            cap |= CAP_ATS;
        }
        if self.prs {
            cap |= CAP_PRS | (self.pri_capacity as u64) << CAP_PRI_CAPACITY_SHIFT;
        }
        cap
    }

    /// The CTRL bits this configuration allows.
    pub const fn ctrl_mask(&self) -> u64 {
        let mut mask = CTRL_ENABLE;
        if self.pasid {
            mask |= CTRL_PASID_EN | CTRL_PRIV_EN;
        }
        if self.ats {
            mask |= CTRL_ATS_EN;
        }
        if self.prs {
            mask |= CTRL_PRI_EN;
        }
        mask
    }

    /// The largest transfer size in bytes.
    pub const fn max_transfer(&self) -> u64 {
        1 << self.max_transfer_shift
    }

    /// Whether the numbers are in range.
    pub const fn is_valid(&self) -> bool {
        self.wq_size > 0
            && self.devtlb_entries > 0
            && self.max_transfer_shift >= 12
            && self.max_transfer_shift <= 31
            && self.pri_capacity > 0
            && self.pri_capacity <= super::port::PRG_INDEX_COUNT
            && self.pasid_width >= 1
            && self.pasid_width as u32 <= Pasid::BITS
            && self.ats_queue_depth < 32
    }

    /// The PCIe capabilities the engine exposes in its configuration space.
    pub const fn pcie_capabilities(&self) -> PcieCapabilities {
        PcieCapabilities {
            ats: if self.ats {
                Some(AtsCapability {
                    invalidate_queue_depth: self.ats_queue_depth,
                })
            } else {
                None
            },
            pri: self.prs,
            pasid_width: if self.pasid {
                Some(self.pasid_width)
            } else {
                None
            },
        }
    }
}

/// An error recorded in the software error register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SoftwareError {
    /// The status no completion record reported (SWERR0 bits 15:8).
    pub status: CompletionStatus,
    /// Opcode byte of the descriptor (SWERR0 bits 23:16).
    pub opcode: u8,
    /// PASID of the descriptor, when it had one (SWERR0 bit 31 and bits 51:32).
    pub pasid: Option<Pasid>,
    /// The completion record address, or the faulting address.
    pub addr: u64,
}

const SWERR_STATUS_SHIFT: u32 = 8;
const SWERR_OPCODE_SHIFT: u32 = 16;
const SWERR_PASID_VALID: u64 = 1 << 31;
const SWERR_PASID_SHIFT: u32 = 32;

impl SoftwareError {
    /// SWERR0 and SWERR1 for this error, with the valid bit.
    pub fn to_regs(&self) -> (u64, u64) {
        let mut w0 = SWERR_VALID
            | (self.status as u64) << SWERR_STATUS_SHIFT
            | (self.opcode as u64) << SWERR_OPCODE_SHIFT;
        if let Some(p) = self.pasid {
            w0 |= SWERR_PASID_VALID | u64::from(p.raw()) << SWERR_PASID_SHIFT;
        }
        (w0, self.addr)
    }

    /// The error SWERR0 and SWERR1 hold, as a driver reads them: `None` while SWERR0's
    /// valid bit is clear, or when its status or PASID fields hold values this device
    /// never writes. The overflow bit is not part of the error.
    pub fn from_regs(w0: u64, w1: u64) -> Option<SoftwareError> {
        if w0 & SWERR_VALID == 0 {
            return None;
        }
        let status = CompletionStatus::from_raw((w0 >> SWERR_STATUS_SHIFT) as u8)?;
        let pasid = if w0 & SWERR_PASID_VALID != 0 {
            Some(Pasid::new((w0 >> SWERR_PASID_SHIFT) as u32 & 0xf_ffff).ok()?)
        } else {
            None
        };
        Some(SoftwareError {
            status,
            opcode: (w0 >> SWERR_OPCODE_SHIFT) as u8,
            pasid,
            addr: w1,
        })
    }
}

/// Errors of register and portal accesses. An access that fails changes nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DmaError {
    /// No register at this BAR 0 offset.
    #[error("MMIO offset {0:#x} is not a register")]
    NoRegister(u64),
    /// A write to a read-only register, or to read-only bits of one; the value is the
    /// offset.
    #[error("MMIO offset {0:#x} is read-only")]
    ReadOnly(u64),
    /// A CTRL write sets bits the configuration does not allow; the value holds those bits.
    #[error("CTRL bits {0:#x} name capabilities the engine does not have")]
    Unsupported(u64),
    /// A CTRL write while enabled changes more than the enable bit.
    #[error("CTRL configuration bits change only while the engine is disabled")]
    ConfigWhileEnabled,
    /// Disabling while descriptors are queued, parked on page requests or draining, or a
    /// CTRL write while the engine is executing.
    #[error("the engine has work in progress (queued or waiting for page responses)")]
    Busy,
    /// A portal write outside the portal or not 64-byte aligned; the value is the offset.
    #[error("portal offset {0:#x} is not a 64-byte slot of the portal")]
    PortalOffset(u64),
    /// A portal write while CTRL.ENABLE is clear.
    #[error("the engine is disabled")]
    Disabled,
    /// A portal write while the work queue is full (ENQCMD's retry indication).
    #[error("the work queue is full; retry")]
    Retry,
    /// [`DmaEngineConfig::is_valid`] refused the configuration.
    #[error("invalid engine configuration")]
    BadConfig,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_software_error_reads_back_from_its_registers() {
        let errors = [
            SoftwareError {
                status: CompletionStatus::CompletionAddrTranslation,
                opcode: 3,
                pasid: Some(Pasid::new(0xf_fffe).unwrap()),
                addr: 0x7fff_1000,
            },
            SoftwareError {
                status: CompletionStatus::BadOpcode,
                opcode: 0xff,
                pasid: None,
                addr: 0,
            },
        ];
        for e in errors {
            let (w0, w1) = e.to_regs();
            assert_eq!(SoftwareError::from_regs(w0, w1), Some(e));
            // Overflow is beside the error; without the valid bit there is none.
            assert_eq!(SoftwareError::from_regs(w0 | SWERR_OVERFLOW, w1), Some(e));
            assert_eq!(SoftwareError::from_regs(w0 & !SWERR_VALID, w1), None);
        }
        // A status byte the device never writes is no error it reported.
        assert_eq!(SoftwareError::from_regs(SWERR_VALID | 0x7f << 8, 0), None);
    }
}
