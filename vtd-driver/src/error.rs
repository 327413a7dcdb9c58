//! What the shared driver machinery reports.

use vsva_mem::MemError;
use vsva_vtd::prq::PageRequestDescError;
use vsva_vtd::regs::Iqei;
use vsva_vtd::{inv_desc::InvDescError, regs::RegError};

/// Why a driver operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The unit refused a register access.
    #[error("register access failed: {0}")]
    Register(#[from] RegError),
    /// The driver's memory refused an access.
    #[error(transparent)]
    Memory(#[from] MemError),
    /// A descriptor could not be encoded; nothing was queued.
    #[error(transparent)]
    Descriptor(#[from] InvDescError),
    /// A page request descriptor could not be decoded.
    #[error("bad page request descriptor: {0}")]
    PageRequest(#[from] PageRequestDescError),
    /// The invalidation queue stopped at descriptor `index` (FSTS.IQE with IQERCD.IQEI).
    /// The driver replaced the descriptor and restarted the queue; the invalidation it
    /// asked for may not have happened.
    #[error("the invalidation queue refused descriptor {index} ({iqei:?})")]
    QueueError {
        /// IQERCD.IQEI.
        iqei: Iqei,
        /// The queue slot of the refused descriptor.
        index: u64,
    },
    /// A device-TLB invalidation timed out (FSTS.ITE) on every resubmission.
    #[error("device-TLB invalidation timed out")]
    InvalidationTimeout,
    /// An invalidation wait did not complete.
    #[error("invalidation wait did not complete")]
    QueueTimeout,
    /// GSTS never reflected the named command.
    #[error("GSTS did not reflect {0}")]
    StatusTimeout(&'static str),
}
