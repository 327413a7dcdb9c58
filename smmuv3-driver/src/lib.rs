//! The arm-smmu-v3 driver machinery that a host and a guest share, as both run the same
//! Linux driver (`drivers/iommu/arm/arm-smmu-v3/arm-smmu-v3.c`, v5.10.y). Section numbers
//! refer to the SMMUv3 architecture specification (IHI 0070).
//!
//! - [`probe`]: the ID registers read into [`Caps`] (`arm_smmu_device_hw_probe`).
//! - [`SmmuDriver`]: the reset and enable sequence (`arm_smmu_device_reset`), the stream
//!   table (linear or 2-level, level-2 tables made on demand and filled with aborting STEs),
//!   STE updates in Linux's order with CMD_CFGI_STE and CMD_SYNC, CD tables (linear or
//!   2-level with 64 KiB leaves) and CD updates with CMD_CFGI_CD, the TLB and ATC
//!   invalidations (`arm_smmu_tlb_inv_*`, `arm_smmu_atc_inv_to_cmd`), page responses, and
//!   global error handling with the command-queue error recovery of
//!   `arm_smmu_cmdq_skip_err`.
//! - [`CommandQueue`]: producing commands and waiting for a CMD_SYNC.
//! - [`OutputQueue`]: draining the event queue and the PRI queue, overflow included
//!   (`arm_smmu_evtq_thread`, `arm_smmu_priq_thread`).
//!
//! What is parameterised: how the registers are reached ([`Registers`]: the physical SMMU
//! for the host, a virtual one for a guest), the memory the tables and queues live in (any
//! [`PhysMem`](vsva_mem::PhysMem)), and where that memory comes from ([`DmaAlloc`]). Policy (domains, VMIDs,
//! nesting on the host; SVA binds in a guest) stays with the users.
//!
//! Differences from Linux: one thread submits commands at a time (the caller's lock), so
//! the lock-free command-queue protocol of `arm_smmu_cmdq_issue_cmdlist` is not needed;
//! interrupts are the owner's to take: [`SmmuDriver::enable_msis`] programs the MSIs, and
//! the owner drains the queues and checks GERROR when one arrives or whenever it chooses;
//! a command the SMMU's features make illegal is refused before anything is queued; an
//! STE update that cannot be made without a transaction seeing a mix of old and new
//! fields goes through an aborting STE (Linux instead requires the old STE not to be live).

mod alloc;
mod cdtab;
mod cmdq;
mod device;
mod error;
mod queues;
mod regs;
mod strtab;
#[cfg(test)]
mod tests;

pub use alloc::DmaAlloc;
pub use cdtab::{CdTable, CTXDESC_L2_ENTRIES};
pub use cmdq::CommandQueue;
pub use device::{probe, Caps, DriverConfig, SmmuDriver, TlbiStage};
pub use error::Error;
pub use queues::{Drained, OutputQueue};
pub use regs::Registers;
pub use strtab::{StrtabFormat, STRTAB_SPLIT};

/// How many register reads a wait for the SMMU may take before the driver gives up: a
/// bound on work, not a time (Linux's `ARM_SMMU_POLL_TIMEOUT_US` bounds a time instead).
pub const POLL_LIMIT: u32 = 1 << 16;
