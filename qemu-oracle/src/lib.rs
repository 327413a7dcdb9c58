//! An oracle for vsva's VMSAv8-64 stage-1 and stage-2 walkers: QEMU's TCG AArch64 MMU.
//!
//! SMMUv3 stage-1 tables are the CPU's own VMSAv8-64 tables (IHI 0070 §3.3, Arm ARM D8),
//! so an AArch64 CPU walking the same tables is a judge of `vsva_smmuv3::walk::walk_stage1`.
//! [`Machine`] runs one `qemu-system-aarch64 -M virt -cpu max -accel tcg` per batch: a RAM
//! image holding the tables a test built, a list of [`Probe`]s and a small EL1 program
//! (assembled by [`a64`]) that switches TTBR0/TTBR1/TCR/PSTATE.PAN per scenario, performs each
//! load, store or fetch (LDR/STR/BLR at EL1, LDTR/STTR with EL0's permissions), catches
//! synchronous aborts and
//! records ESR_EL1/FAR_EL1 or the value read, then writes the results and the final
//! translation tables to a file through semihosting and exits. It probes from TTBR1's
//! range, or from TTBR0's at its physical address when a scenario's TTBR1 is its own
//! ([`Harness`]: EPD1, T1SZ, TG1, TBI1). [`Harness::Stage2`] checks
//! `vsva_smmuv3::walk::walk_stage2` the same way from EL2 ([`el2`]): stage-2 tables installed
//! with VTTBR_EL2/VTCR_EL2, each probe an EL1 access with stage 1 off.
//!
//! [`x86`] does the same for VT-d's first-level walker with `qemu-system-x86_64 -cpu max`
//! (assembled by [`x86asm`]): 1 GiB pages, 5-level paging and SMEP, which the KVM oracle
//! cannot check on a host whose KVM lacks them.

pub mod a64;
mod child;
pub mod el2;
mod error;
mod machine;
pub mod x86;
pub mod x86asm;

pub use error::OracleError;
pub use machine::{
    fetch_snippet, layout, tcr, tcr_tg0, tcr_ttbr1, Abort, Features, Harness, Machine, Outcome,
    Probe, ProbeOp, Results, TCR_EPD0, TCR_EPD1, TCR_TBI0, TCR_TBI1,
};
