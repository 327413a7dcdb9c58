//! What the driver reports.

use vsva_mem::MemError;
use vsva_smmuv3::{cd::BadCd, cmd::Cmd, cmd::CmdError, regs::RegError, ste::BadSte};

/// Why a driver operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The SMMU refused a register access.
    #[error("register access failed: {0}")]
    Register(#[from] RegError),
    /// The driver's memory refused an access.
    #[error(transparent)]
    Memory(#[from] MemError),
    /// The ID registers describe an SMMU the driver cannot use.
    #[error("unsupported SMMU: {0}")]
    Unsupported(&'static str),
    /// The allocator had no memory left; nothing was changed.
    #[error("out of memory for SMMU tables or queues")]
    NoMemory,
    /// A StreamID beyond the stream table.
    #[error("StreamID {0:#x} is beyond the stream table")]
    BadStreamId(u32),
    /// A SubstreamID beyond the CD table.
    #[error("SubstreamID {0:#x} is beyond the CD table")]
    BadSubstreamId(u32),
    /// An STE the SMMU would refuse (C_BAD_STE); nothing was written.
    #[error("the STE would be C_BAD_STE: {0}")]
    BadSte(BadSte),
    /// A CD the SMMU would refuse (C_BAD_CD); nothing was written.
    #[error("the CD would be C_BAD_CD: {0}")]
    BadCd(BadCd),
    /// A command the SMMU would refuse with CERROR_ILL; nothing was queued.
    #[error("illegal command for this SMMU: {0:?}")]
    IllegalCommand(Cmd),
    /// The command queue stopped on a command (CMDQ_CONS.ERR); the driver recovered as
    /// `arm_smmu_cmdq_skip_err` does and the batch completed, but the command it names may
    /// not have taken effect.
    #[error("the command queue stopped with {error} on {raw:#x?}")]
    CommandError {
        /// CMDQ_CONS.ERR.
        error: CmdError,
        /// The command the queue stopped on.
        raw: [u64; 2],
    },
    /// The SMMU did not consume the command queue up to a CMD_SYNC.
    #[error("CMD_SYNC did not complete")]
    SyncTimeout,
    /// CR0ACK never reflected a CR0 write.
    #[error("CR0ACK did not reflect CR0 {0:#x}")]
    AckTimeout(u32),
}
