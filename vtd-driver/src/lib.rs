//! The intel-iommu driver machinery that the host and the guest share, as on real machines
//! both run the same driver (Linux v5.10 `drivers/iommu/intel/`).
//!
//! - [`InvalidationQueue`]: queued invalidation, submit and wait (`qi_submit_sync`), with
//!   the recovery from invalidation queue errors, device-TLB time-outs and completion
//!   errors of `qi_check_fault` (VT-d §6.5.2.10).
//! - [`inv`]: the invalidation descriptors the driver builds for address ranges, and
//!   [`mask`], the address-mask and ATS-size encodings they use.
//! - [`PageRequestRing`]: the page request ring (`prq_event_thread`: PQH/PQT, PPR, PRO)
//!   and the page group response to a request.
//! - [`tables`]: how root, context and PASID entries are written (P last) and cleared (P
//!   first), and how large a PASID directory is (`intel_pasid_alloc_table`).
//! - [`take_fault_records`]: the fault event handler's reading of the fault recording
//!   registers (`dmar_fault`).
//! - [`GlobalCommand`]: the GCMD/GSTS handshakes (`iommu_set_root_entry`,
//!   `dmar_enable_qi`, `dmar_disable_qi`, `iommu_flush_write_buffer`).
//!
//! What is parameterised: where the driver's memory lives (any [`PhysMem`]: host memory for
//! the host driver, guest RAM for the guest driver) and how its registers are reached
//! ([`Registers`]: the physical unit's MMIO for the host, the vIOMMU's for the guest).
//! Policy (domains and nested binds on the host, SVA binds and virtual commands in the
//! guest) stays with the users.
//!
//! [`PhysMem`]: vsva_mem::PhysMem

mod error;
mod faults;
mod handshake;
pub mod inv;
pub mod mask;
mod prq;
mod qi;
mod regs;
pub mod tables;
#[cfg(test)]
mod testunit;

pub use error::Error;
pub use faults::take_fault_records;
pub use handshake::GlobalCommand;
pub use prq::{group_response, PageRequestRing, PRO_RETRIES, PRQ_BYTES, PRQ_ORDER};
pub use qi::{InvalidationQueue, QUEUE_BYTES, QUEUE_ENTRIES, QUEUE_ORDER, STATUS_BYTES};
pub use regs::Registers;

/// How many register or status reads a wait for the unit may take before the driver gives
/// up: a bound on work, not a time (Linux's `IOMMU_WAIT_OP` waits for a time instead).
pub const POLL_LIMIT: u32 = 1 << 20;
