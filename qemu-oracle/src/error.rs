//! Why an oracle run failed: one error type for the AArch64 ([`crate::Machine`]) and x86
//! ([`crate::x86::Machine`]) oracles, which start, wait for and read back a QEMU child the
//! same way.

use std::time::Duration;

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum OracleError {
    /// The emulator (`qemu-system-aarch64` or `qemu-system-x86_64`) is not installed.
    #[error("{0} not found on PATH")]
    NoQemu(&'static str),
    /// Too many probes for the probe area.
    #[error("{count} probes do not fit (at most {max})")]
    TooManyProbes {
        /// The probes asked for.
        count: usize,
        /// The most a run takes.
        max: usize,
    },
    /// A probe the program cannot run as asked.
    #[error("probe {index}: {why}")]
    BadProbe {
        /// Its index.
        index: usize,
        /// What is wrong.
        why: &'static str,
    },
    /// The AArch64 program could not be assembled.
    #[error("assembling the program: {0}")]
    Asm(#[from] crate::a64::AsmError),
    /// The x86 program could not be assembled.
    #[error("assembling the program: {0}")]
    X86Asm(#[from] crate::x86asm::AsmError),
    /// The RAM image or file could not be set up, written or read.
    #[error("guest memory: {0}")]
    Memory(String),
    /// A file or process operation failed.
    #[error("{what}: {err}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        err: std::io::Error,
    },
    /// QEMU did not finish in time.
    #[error("qemu did not finish within {0:?}")]
    Timeout(Duration),
    /// QEMU did not exit the way the program ends a run.
    #[error("qemu exited with {status}: {stderr}")]
    QemuFailed {
        /// Its exit status (and the one the program exits with).
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// The results file is not what the program writes.
    #[error("results file has {0} bytes, expected {1}")]
    BadResults(usize, usize),
    /// The program did not mark the run finished.
    #[error("the program did not finish its probes")]
    Unfinished,
}

/// Maps an I/O error to [`OracleError::Io`] saying what was being done.
pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> OracleError {
    let what = what.into();
    move |err| OracleError::Io { what, err }
}

/// Maps a guest-memory error to [`OracleError::Memory`].
pub(crate) fn mem_err(e: impl std::fmt::Display) -> OracleError {
    OracleError::Memory(e.to_string())
}
