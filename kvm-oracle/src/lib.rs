//! An oracle for vsva's first-level (IA-32e) page walker: the real x86 MMU, through KVM.
//!
//! VT-d first-level tables use the CPU's own paging format (VT-d spec §3.6, §9.7), so a
//! vCPU walking the same tables is the best judge of the walker. [`Machine`] is one KVM VM
//! with one vCPU in 64-bit long mode whose RAM is vsva host memory: tests build tables
//! there with vsva's builder, probe addresses with the vCPU and compare what it reached
//! (or how it faulted, and which accessed/dirty bits it set) with vsva's walk.
//!
//! [`tables`] draws the random tables and probe addresses, and holds the walker's private
//! view of them; `vsva-qemu-oracle`'s x86-64 test uses it too.

#[cfg(target_arch = "x86_64")]
pub mod guest;
#[cfg(target_arch = "x86_64")]
mod machine;
pub mod tables;

#[cfg(target_arch = "x86_64")]
pub use machine::{
    pf, Access, CpuFeatures, Machine, OracleError, Outcome, PagingMode, Privilege, Probe,
};
