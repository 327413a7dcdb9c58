//! Register offsets and bit definitions of the remapping unit (VT-d §10.4), for the model
//! that implements the registers and for the drivers that program them.

/// Register offsets from the unit's base address (§10.4, table "Remapping Hardware
/// Register Layout"). The IOTLB registers sit at ECAP.IRO·16 and the fault recording
/// registers at CAP.FRO·16.
pub mod offset {
    /// Version (32 bits).
    pub const VER: u64 = 0x000;
    /// Capability (64 bits).
    pub const CAP: u64 = 0x008;
    /// Extended capability (64 bits).
    pub const ECAP: u64 = 0x010;
    /// Global command (32 bits).
    pub const GCMD: u64 = 0x018;
    /// Global status (32 bits).
    pub const GSTS: u64 = 0x01c;
    /// Root table address (64 bits).
    pub const RTADDR: u64 = 0x020;
    /// Context command (64 bits).
    pub const CCMD: u64 = 0x028;
    /// Fault status (32 bits).
    pub const FSTS: u64 = 0x034;
    /// Fault event control (32 bits).
    pub const FECTL: u64 = 0x038;
    /// Fault event data (32 bits).
    pub const FEDATA: u64 = 0x03c;
    /// Fault event address (32 bits).
    pub const FEADDR: u64 = 0x040;
    /// Fault event upper address (32 bits).
    pub const FEUADDR: u64 = 0x044;
    /// Invalidation queue head (64 bits).
    pub const IQH: u64 = 0x080;
    /// Invalidation queue tail (64 bits).
    pub const IQT: u64 = 0x088;
    /// Invalidation queue address (64 bits).
    pub const IQA: u64 = 0x090;
    /// Invalidation completion status (32 bits).
    pub const ICS: u64 = 0x09c;
    /// Invalidation event control (32 bits).
    pub const IECTL: u64 = 0x0a0;
    /// Invalidation event data (32 bits).
    pub const IEDATA: u64 = 0x0a4;
    /// Invalidation event address (32 bits).
    pub const IEADDR: u64 = 0x0a8;
    /// Invalidation event upper address (32 bits).
    pub const IEUADDR: u64 = 0x0ac;
    /// Invalidation queue error record (64 bits).
    pub const IQERCD: u64 = 0x0b0;
    /// Interrupt remapping table address (64 bits).
    pub const IRTA: u64 = 0x0b8;
    /// Page request queue head (64 bits).
    pub const PQH: u64 = 0x0c0;
    /// Page request queue tail (64 bits).
    pub const PQT: u64 = 0x0c8;
    /// Page request queue address (64 bits).
    pub const PQA: u64 = 0x0d0;
    /// Page request status (32 bits).
    pub const PRS: u64 = 0x0dc;
    /// Page request event control (32 bits).
    pub const PECTL: u64 = 0x0e0;
    /// Page request event data (32 bits).
    pub const PEDATA: u64 = 0x0e4;
    /// Page request event address (32 bits).
    pub const PEADDR: u64 = 0x0e8;
    /// Page request event upper address (32 bits).
    pub const PEUADDR: u64 = 0x0ec;
    /// Start of the MTRR registers (not implemented; kept free of other registers).
    pub const MTRR_START: u64 = 0x100;
    /// End of the MTRR registers.
    pub const MTRR_END: u64 = 0x220;
    /// Virtual command capability (64 bits).
    pub const VCCAP: u64 = 0xe00;
    /// Virtual command (64 bits).
    pub const VCMD: u64 = 0xe10;
    /// Virtual command response (64 bits).
    pub const VCRSP: u64 = 0xe20;
    /// Invalidate address register, from the IOTLB register offset (64 bits).
    pub const IVA_FROM_IRO: u64 = 0x0;
    /// IOTLB invalidate register, from the IOTLB register offset (64 bits).
    pub const IOTLB_FROM_IRO: u64 = 0x8;
}

/// Global command register (GCMD_REG, §10.4.4).
pub mod gcmd {
    /// Translation enable.
    pub const TE: u32 = 1 << 31;
    /// Set root table pointer.
    pub const SRTP: u32 = 1 << 30;
    /// Set fault log.
    pub const SFL: u32 = 1 << 29;
    /// Enable advanced fault logging.
    pub const EAFL: u32 = 1 << 28;
    /// Write buffer flush.
    pub const WBF: u32 = 1 << 27;
    /// Queued invalidation enable.
    pub const QIE: u32 = 1 << 26;
    /// Interrupt remapping enable.
    pub const IRE: u32 = 1 << 25;
    /// Set interrupt remap table pointer.
    pub const SIRTP: u32 = 1 << 24;
    /// Compatibility format interrupt.
    pub const CFI: u32 = 1 << 23;
}

/// Global status register (GSTS_REG, §10.4.5): one status bit per command bit.
pub mod gsts {
    /// Translation enable status.
    pub const TES: u32 = 1 << 31;
    /// Root table pointer status.
    pub const RTPS: u32 = 1 << 30;
    /// Fault log status.
    pub const FLS: u32 = 1 << 29;
    /// Advanced fault logging status.
    pub const AFLS: u32 = 1 << 28;
    /// Write buffer flush status.
    pub const WBFS: u32 = 1 << 27;
    /// Queued invalidation enable status.
    pub const QIES: u32 = 1 << 26;
    /// Interrupt remapping enable status.
    pub const IRES: u32 = 1 << 25;
    /// Interrupt remapping table pointer status.
    pub const IRTPS: u32 = 1 << 24;
    /// Compatibility format interrupt status.
    pub const CFIS: u32 = 1 << 23;
}

/// Root table address register (RTADDR_REG, §10.4.6).
pub mod rtaddr {
    /// Root table address, bits 63:12.
    pub const RTA: u64 = !0xfff;
    /// Translation table mode, bits 11:10.
    pub const TTM_SHIFT: u32 = 10;
    /// Translation table mode mask.
    pub const TTM: u64 = 0xc00;
}

/// Context command register (CCMD_REG, §10.4.7).
pub mod ccmd {
    /// Invalidate context cache.
    pub const ICC: u64 = 1 << 63;
    /// Context invalidation request granularity, bits 62:61.
    pub const CIRG_SHIFT: u32 = 61;
    /// Context actual invalidation granularity, bits 60:59.
    pub const CAIG_SHIFT: u32 = 59;
    /// Function mask, bits 33:32.
    pub const FM_SHIFT: u32 = 32;
    /// Source id, bits 31:16.
    pub const SID_SHIFT: u32 = 16;
    /// Bits software can write.
    pub const WRITABLE: u64 = 0xe000_0003_ffff_ffff;
}

/// IOTLB invalidate register (IOTLB_REG, §10.4.8.1) and invalidate address register
/// (IVA_REG, §10.4.8.2).
pub mod iotlb {
    /// Invalidate IOTLB.
    pub const IVT: u64 = 1 << 63;
    /// IOTLB invalidation request granularity, bits 61:60.
    pub const IIRG_SHIFT: u32 = 60;
    /// IOTLB actual invalidation granularity, bits 58:57.
    pub const IAIG_SHIFT: u32 = 57;
    /// Drain reads.
    pub const DR: u64 = 1 << 49;
    /// Drain writes.
    pub const DW: u64 = 1 << 48;
    /// Domain id, bits 47:32.
    pub const DID_SHIFT: u32 = 32;
    /// Bits software can write in IOTLB_REG.
    pub const WRITABLE: u64 = 0xb003_ffff_0000_0000;
    /// IVA_REG: invalidation hint.
    pub const IVA_IH: u64 = 1 << 6;
    /// IVA_REG: address mask, bits 5:0.
    pub const IVA_AM: u64 = 0x3f;
    /// Bits software can write in IVA_REG.
    pub const IVA_WRITABLE: u64 = !0xf80;
}

/// Fault status register (FSTS_REG, §10.4.9).
pub mod fsts {
    /// Primary fault overflow (RW1C).
    pub const PFO: u32 = 1 << 0;
    /// Primary pending fault: some fault recording register has F set (read-only).
    pub const PPF: u32 = 1 << 1;
    /// Advanced fault overflow (RW1C).
    pub const AFO: u32 = 1 << 2;
    /// Advanced pending fault (RW1C).
    pub const APF: u32 = 1 << 3;
    /// Invalidation queue error (RW1C).
    pub const IQE: u32 = 1 << 4;
    /// Invalidation completion error (RW1C).
    pub const ICE: u32 = 1 << 5;
    /// Invalidation time-out error (RW1C).
    pub const ITE: u32 = 1 << 6;
    /// Fault record index, bits 15:8.
    pub const FRI_SHIFT: u32 = 8;
    /// Fault record index mask.
    pub const FRI: u32 = 0xff00;
    /// The write-1-to-clear bits.
    pub const RW1C: u32 = PFO | AFO | APF | IQE | ICE | ITE;
}

/// Event control registers (FECTL_REG §10.4.10, IECTL_REG §10.4.25, PECTL_REG §10.4.35).
pub mod event_control {
    /// Interrupt mask.
    pub const IM: u32 = 1 << 31;
    /// Interrupt pending (read-only).
    pub const IP: u32 = 1 << 30;
}

/// Invalidation queue registers (IQH_REG, IQT_REG, IQA_REG, §10.4.21-23).
pub mod iq {
    /// Queue head/tail: byte offset into the queue, bits 18:4.
    pub const OFFSET: u64 = 0x7fff0;
    /// IQA: queue base address, bits 63:12.
    pub const IQA_BASE: u64 = !0xfff;
    /// IQA: descriptor width, 1 for 256-bit descriptors.
    pub const IQA_DW: u64 = 1 << 11;
    /// IQA: queue size, 2^QS 4-KiB pages, bits 2:0.
    pub const IQA_QS: u64 = 0x7;
}

/// Invalidation completion status register (ICS_REG, §10.4.24).
pub mod ics {
    /// Invalidation wait descriptor complete (RW1C).
    pub const IWC: u32 = 1;
}

/// Invalidation queue error record register (IQERCD_REG, §10.4.29).
pub mod iqercd {
    /// Invalidation queue error info, bits 3:0.
    pub const IQEI: u64 = 0xf;
    /// Invalidation time-out error source id, bits 47:32.
    pub const ITESID_SHIFT: u32 = 32;
    /// Invalidation completion error source id, bits 63:48.
    pub const ICESID_SHIFT: u32 = 48;
}

/// Page request queue registers (PQH_REG, PQT_REG, PQA_REG, PRS_REG, §10.4.31-34).
pub mod pq {
    /// Queue head/tail: byte offset into the queue, bits 18:5.
    pub const OFFSET: u64 = 0x7ffe0;
    /// PQA: queue base address, bits 63:12.
    pub const PQA_BASE: u64 = !0xfff;
    /// PQA: queue size, 2^PQS 4-KiB pages, bits 2:0.
    pub const PQA_PQS: u64 = 0x7;
    /// PRS: pending page request (RW1C).
    pub const PPR: u32 = 1 << 0;
    /// PRS: page request overflow (RW1C).
    pub const PRO: u32 = 1 << 1;
    /// Size of a page request descriptor.
    pub const DESC_SIZE: u64 = 32;
}

/// Virtual command registers (VCCAP_REG, VCMD_REG, VCRSP_REG, §10.4.43-45).
pub mod vcmd {
    /// VCCAP: PASID allocation commands supported.
    pub const VCCAP_PAS: u64 = 1;
    /// VCMD: command, bits 7:0.
    pub const CMD: u64 = 0xff;
    /// VCMD: the operand starts at bit 8.
    pub const OPERAND_SHIFT: u32 = 8;
    /// Command: allocate a PASID.
    pub const ALLOC_PASID: u8 = 1;
    /// Command: free the PASID in the operand.
    pub const FREE_PASID: u8 = 2;
    /// VCRSP: command in progress.
    pub const VCRSP_IP: u64 = 1;
    /// VCRSP: status code, bits 2:1.
    pub const VCRSP_SC_SHIFT: u32 = 1;
    /// VCRSP: the result starts at bit 8.
    pub const VCRSP_RESULT_SHIFT: u32 = 8;
}
