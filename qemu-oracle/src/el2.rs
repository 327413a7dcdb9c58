//! The stage-2 harness ([`crate::Harness::Stage2`]): a program at EL2 (`-M
//! virt,virtualization=on` starts the CPU there) with its own MMU off, which installs a
//! test's stage-2 tables (VTTBR_EL2, VTCR_EL2, HCR_EL2.VM; Arm ARM D8, "stage 2
//! translation") and performs each probe at EL1 with stage 1 off, so that the probe's
//! address is its IPA, or on (nested: TTBR0_EL1/TCR_EL1 of a test's stage-1 table in IPA
//! space). A stage-2 fault is taken to EL2 (ESR_EL2, FAR_EL2, HPFAR_EL2); a stage-1 fault
//! to EL1, whose vectors pass ESR_EL1 and FAR_EL1 on with HVC #1; a probe that completes
//! returns with HVC #0.

use crate::a64::{
    Asm, AsmError, Cond, SysReg, X0, X1, X10, X11, X12, X13, X14, X19, X2, X20, X21, X3, X4, X9,
};
use crate::machine::layout::{PROBES, RESULTS, S2_STUB, VECTORS};
use crate::machine::{
    probe_loop_end, probe_loop_head, read_back_and_exit, record_features, ProbeOp, HEADER,
};

/// The IPA of the EL1 stub: a test's stage-2 table maps IPA 0 to [`VECTORS`] for the
/// program's 64 KiB (readable, executable, AF set), one page or block of any granule.
pub const S2_STUB_IPA: u64 = S2_STUB - VECTORS;
/// SCTLR_EL1 with stage 1 off: the v8.0 RES1 bits (M, C and I clear).
const SCTLR_EL1_OFF: u64 = 0x30d0_0800;
/// SCTLR_EL1 with stage 1 on: M, C and I set; no alignment checks, WXN clear.
const SCTLR_EL1_ON: u64 = SCTLR_EL1_OFF | 1 | (1 << 2) | (1 << 12);
/// MAIR_EL1: every attribute Normal, Inner/Outer Write-Back.
const MAIR: u64 = u64::MAX;
/// The EL1 vectors, in the stub's page (VBAR_EL1 needs 2 KiB alignment): each sends the
/// exception to EL2 with HVC #1, ESR_EL1 in X13 and FAR_EL1 in X14.
const EL1_VECTORS: u64 = 0x800;
/// HCR_EL2: VM (stage 2 on) and RW (EL1 is AArch64).
const HCR: u64 = 1 | (1 << 31);
/// SPSR_EL2 for the ERET to a probe: EL1h, DAIF masked.
const SPSR_EL1H: u64 = 0x3c5;
/// ESR_ELx.EC of an HVC from AArch64.
const EC_HVC: u64 = 0x16;
/// The HVC immediate of an exception the EL1 vectors pass on.
const HVC_EL1_FAULT: u16 = 1;

/// The EL2 program for `count` probes, to be placed at [`VECTORS`] (entry 0x800 on), and
/// its EL1 stub at [`S2_STUB`].
pub(crate) fn program(count: u64) -> Result<Vec<u32>, AsmError> {
    let mut a = Asm::new();
    let (keep, next) = (a.label(), a.label());
    let el1_fault = a.label();
    // 16 vector entries: an HVC #0 from the stub ends a probe that completed (X3 its
    // value), an HVC #1 from the EL1 vectors one that took a stage-1 fault at EL1; anything
    // else is recorded in X20's record (ESR, FAR, HPFAR) and ends the probe.
    for slot in 0..16 {
        a.pad_to(slot * 0x80);
        a.mrs(X9, SysReg::ESR_EL2);
        a.lsr_imm(X11, X9, 26);
        let other = a.label();
        a.cmp_imm(X11, EC_HVC);
        a.b_cond(Cond::Ne, other);
        a.lsl_imm(X11, X9, 48);
        a.lsr_imm(X11, X11, 48);
        a.cmp_imm(X11, u64::from(HVC_EL1_FAULT));
        a.b_cond(Cond::Eq, el1_fault);
        a.b(keep);
        a.bind(other);
        a.movz(X12, 1, 0);
        a.str(X12, X20, 0);
        a.str(X9, X20, 8);
        a.mrs(X10, SysReg::FAR_EL2);
        a.str(X10, X20, 16);
        a.mrs(X10, SysReg::HPFAR_EL2);
        a.str(X10, X20, 24);
        a.b(next);
    }
    a.pad_to(0x800);
    record_features(&mut a);
    a.mov_imm(X0, VECTORS);
    a.msr(SysReg::VBAR_EL2, X0);
    a.mov_imm(X0, SCTLR_EL1_OFF);
    a.msr(SysReg::SCTLR_EL1, X0);
    a.mov_imm(X0, MAIR);
    a.msr(SysReg::MAIR_EL1, X0);
    a.mov_imm(X0, S2_STUB_IPA + EL1_VECTORS);
    a.msr(SysReg::VBAR_EL1, X0);
    a.mov_imm(X0, HCR);
    a.msr(SysReg::HCR_EL2, X0);
    a.isb();
    a.mov_imm(X19, PROBES);
    a.mov_imm(X20, RESULTS + HEADER);
    a.mov_imm(X21, count);
    let (next_probe, done, switch, go) = (a.label(), a.label(), a.label(), a.label());
    let switch1 = a.label();
    probe_loop_head(&mut a, next_probe, done);
    // Every probe walks the tables afresh.
    a.tlbi_vmalls12e1();
    a.dsb_sy();
    a.isb();
    a.cmp_imm(X1, ProbeOp::Stage2Switch.code());
    a.b_cond(Cond::Eq, switch);
    a.cmp_imm(X1, ProbeOp::Stage1Switch { enable: false }.code());
    a.b_cond(Cond::Eq, switch1);
    // The stub's entry for the op: LDR at +0, STR at +8, BLR at +16.
    for (op, at) in [
        (ProbeOp::Load, 0),
        (ProbeOp::Store, 8),
        (ProbeOp::Fetch, 16),
    ] {
        let skip = a.label();
        a.cmp_imm(X1, op.code());
        a.b_cond(Cond::Ne, skip);
        a.mov_imm(X4, S2_STUB_IPA + at);
        a.b(go);
        a.bind(skip);
    }
    // Machine::run refuses other ops; skip one anyway.
    a.b(next);
    a.bind(go);
    a.msr(SysReg::ELR_EL2, X4);
    a.mov_imm(X4, SPSR_EL1H);
    a.msr(SysReg::SPSR_EL2, X4);
    a.eret();
    a.bind(switch);
    a.msr(SysReg::VTTBR_EL2, X0);
    a.msr(SysReg::VTCR_EL2, X2);
    a.isb();
    a.tlbi_vmalls12e1();
    a.dsb_sy();
    a.isb();
    a.b(next);
    // Stage 1: TTBR0_EL1, TCR_EL1, then SCTLR_EL1 off or on as the last word says.
    a.bind(switch1);
    a.msr(SysReg::TTBR0_EL1, X0);
    a.msr(SysReg::TCR_EL1, X2);
    a.ldr(X3, X19, 24);
    let (on, set) = (a.label(), a.label());
    a.cbnz(X3, on);
    a.mov_imm(X4, SCTLR_EL1_OFF);
    a.b(set);
    a.bind(on);
    a.mov_imm(X4, SCTLR_EL1_ON);
    a.bind(set);
    a.msr(SysReg::SCTLR_EL1, X4);
    a.isb();
    a.tlbi_vmalls12e1();
    a.dsb_sy();
    a.isb();
    a.b(next);
    // A stage-1 fault the EL1 vectors passed on.
    a.bind(el1_fault);
    a.movz(X12, 1, 0);
    a.str(X12, X20, 0);
    a.str(X13, X20, 8);
    a.str(X14, X20, 16);
    a.b(next);
    probe_loop_end(&mut a, (keep, next), next_probe, done);
    // Stage 2 off for the read-back (EL2's MMU is off throughout).
    a.movz(X0, 0, 0);
    a.msr(SysReg::HCR_EL2, X0);
    a.isb();
    read_back_and_exit(&mut a, count);
    // The EL1 stub: the access, then HVC back to EL2.
    a.pad_to(S2_STUB - VECTORS);
    a.ldr(X3, X0, 0);
    a.hvc(0);
    a.str(X2, X0, 0);
    a.hvc(0);
    a.blr(X0);
    a.hvc(0);
    // The EL1 vectors.
    for slot in 0..16 {
        a.pad_to(S2_STUB - VECTORS + EL1_VECTORS + slot * 0x80);
        a.mrs(X13, SysReg::ESR_EL1);
        a.mrs(X14, SysReg::FAR_EL1);
        a.hvc(HVC_EL1_FAULT);
    }
    a.finish()
}
