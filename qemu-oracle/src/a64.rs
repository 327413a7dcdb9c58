//! A tiny A64 assembler: the handful of instructions the oracle's EL1 and EL2 programs
//! use, encoded as the Arm ARM (DDI 0487, chapter C6 "A64 Base Instruction Descriptions")
//! lays them out, with labels for branches. No cross toolchain is needed to build the
//! programs.

use std::fmt;

/// A general-purpose register number (0 to 30); 31 is XZR or SP as the instruction reads it.
pub type Reg = u32;

/// The zero register (or SP, by instruction).
pub const XZR: Reg = 31;

macro_rules! registers {
    ($($name:ident = $n:literal),* $(,)?) => {
        $(
            #[doc = concat!("General-purpose register ", stringify!($name), ".")]
            pub const $name: Reg = $n;
        )*
    };
}

registers! {
    X0 = 0, X1 = 1, X2 = 2, X3 = 3, X4 = 4, X5 = 5, X6 = 6, X7 = 7, X8 = 8, X9 = 9,
    X10 = 10, X11 = 11, X12 = 12, X13 = 13, X14 = 14, X15 = 15, X16 = 16, X17 = 17,
    X18 = 18, X19 = 19, X20 = 20, X21 = 21, X22 = 22, X23 = 23, X24 = 24, X25 = 25,
    X26 = 26, X27 = 27, X28 = 28, X29 = 29, X30 = 30,
}

/// A system register as MRS/MSR name it: op0, op1, CRn, CRm, op2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SysReg {
    op0: u32,
    op1: u32,
    crn: u32,
    crm: u32,
    op2: u32,
}

impl SysReg {
    const fn new(op0: u32, op1: u32, crn: u32, crm: u32, op2: u32) -> Self {
        SysReg {
            op0,
            op1,
            crn,
            crm,
            op2,
        }
    }

    /// The MRS/MSR operand bits 20:5.
    const fn bits(self) -> u32 {
        ((self.op0 - 2) << 19)
            | (self.op1 << 16)
            | (self.crn << 12)
            | (self.crm << 8)
            | (self.op2 << 5)
    }

    /// SCTLR_EL1.
    pub const SCTLR_EL1: SysReg = SysReg::new(3, 0, 1, 0, 0);
    /// TTBR0_EL1.
    pub const TTBR0_EL1: SysReg = SysReg::new(3, 0, 2, 0, 0);
    /// TTBR1_EL1.
    pub const TTBR1_EL1: SysReg = SysReg::new(3, 0, 2, 0, 1);
    /// TCR_EL1.
    pub const TCR_EL1: SysReg = SysReg::new(3, 0, 2, 0, 2);
    /// ELR_EL1.
    pub const ELR_EL1: SysReg = SysReg::new(3, 0, 4, 0, 1);
    /// ESR_EL1.
    pub const ESR_EL1: SysReg = SysReg::new(3, 0, 5, 2, 0);
    /// SPSR_EL1.
    pub const SPSR_EL1: SysReg = SysReg::new(3, 0, 4, 0, 0);
    /// FAR_EL1.
    pub const FAR_EL1: SysReg = SysReg::new(3, 0, 6, 0, 0);
    /// MAIR_EL1.
    pub const MAIR_EL1: SysReg = SysReg::new(3, 0, 10, 2, 0);
    /// VBAR_EL1.
    pub const VBAR_EL1: SysReg = SysReg::new(3, 0, 12, 0, 0);
    /// ID_AA64MMFR0_EL1.
    pub const ID_AA64MMFR0_EL1: SysReg = SysReg::new(3, 0, 0, 7, 0);
    /// ID_AA64MMFR1_EL1.
    pub const ID_AA64MMFR1_EL1: SysReg = SysReg::new(3, 0, 0, 7, 1);
    /// HCR_EL2.
    pub const HCR_EL2: SysReg = SysReg::new(3, 4, 1, 1, 0);
    /// VTTBR_EL2.
    pub const VTTBR_EL2: SysReg = SysReg::new(3, 4, 2, 1, 0);
    /// VTCR_EL2.
    pub const VTCR_EL2: SysReg = SysReg::new(3, 4, 2, 1, 2);
    /// SPSR_EL2.
    pub const SPSR_EL2: SysReg = SysReg::new(3, 4, 4, 0, 0);
    /// ELR_EL2.
    pub const ELR_EL2: SysReg = SysReg::new(3, 4, 4, 0, 1);
    /// ESR_EL2.
    pub const ESR_EL2: SysReg = SysReg::new(3, 4, 5, 2, 0);
    /// FAR_EL2.
    pub const FAR_EL2: SysReg = SysReg::new(3, 4, 6, 0, 0);
    /// HPFAR_EL2.
    pub const HPFAR_EL2: SysReg = SysReg::new(3, 4, 6, 0, 4);
    /// VBAR_EL2.
    pub const VBAR_EL2: SysReg = SysReg::new(3, 4, 12, 0, 0);
    /// CurrentEL.
    pub const CURRENT_EL: SysReg = SysReg::new(3, 0, 4, 2, 2);
}

/// A branch condition (Arm ARM C1.2.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cond {
    /// Equal (Z set).
    Eq = 0,
    /// Not equal.
    Ne = 1,
}

/// A branch target, bound to an instruction index by [`Asm::bind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Label(usize);

/// Why a program could not be assembled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AsmError {
    /// A branch names a label that was never bound.
    #[error("label {0} is used but never bound")]
    Unbound(usize),
    /// A label was bound twice.
    #[error("label {0} is bound twice")]
    Rebound(usize),
    /// A branch target is out of the instruction's reach.
    #[error("branch at word {at} cannot reach word {to}")]
    OutOfReach {
        /// The branch's index.
        at: usize,
        /// The target's index.
        to: usize,
    },
    /// An immediate does not fit its field.
    #[error("immediate {0:#x} does not fit")]
    Immediate(u64),
}

#[derive(Clone, Copy, Debug)]
enum Fixup {
    /// B: imm26 at bits 25:0.
    Imm26,
    /// B.cond, CBZ, CBNZ: imm19 at bits 23:5.
    Imm19,
}

/// An A64 program under construction: 32-bit little-endian instruction words.
#[derive(Default)]
pub struct Asm {
    words: Vec<u32>,
    labels: Vec<Option<usize>>,
    fixups: Vec<(usize, usize, Fixup)>,
    error: Option<AsmError>,
}

impl fmt::Debug for Asm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Asm({} words)", self.words.len())
    }
}

impl Asm {
    /// An empty program.
    pub fn new() -> Self {
        Asm::default()
    }

    /// The byte offset of the next instruction.
    pub fn offset(&self) -> u64 {
        self.words.len() as u64 * 4
    }

    /// Appends a raw instruction word.
    pub fn word(&mut self, w: u32) {
        self.words.push(w);
    }

    /// NOPs up to byte offset `offset` (a multiple of 4 not behind the current one).
    pub fn pad_to(&mut self, offset: u64) {
        if offset < self.offset() || offset % 4 != 0 {
            self.error.get_or_insert(AsmError::Immediate(offset));
            return;
        }
        while self.offset() < offset {
            self.nop();
        }
    }

    /// A new unbound label.
    pub fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    /// Binds `l` to the next instruction.
    pub fn bind(&mut self, l: Label) {
        if self.labels[l.0].replace(self.words.len()).is_some() {
            self.error.get_or_insert(AsmError::Rebound(l.0));
        }
    }

    fn branch(&mut self, base: u32, l: Label, kind: Fixup) {
        self.fixups.push((self.words.len(), l.0, kind));
        self.words.push(base);
    }

    /// The instruction words, with every branch resolved.
    pub fn finish(mut self) -> Result<Vec<u32>, AsmError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        for &(at, label, kind) in &self.fixups {
            let to = self.labels[label].ok_or(AsmError::Unbound(label))?;
            let delta = to as i64 - at as i64;
            let (bits, shift) = match kind {
                Fixup::Imm26 => (26, 0),
                Fixup::Imm19 => (19, 5),
            };
            if delta < -(1 << (bits - 1)) || delta >= 1 << (bits - 1) {
                return Err(AsmError::OutOfReach { at, to });
            }
            self.words[at] |= ((delta as u32) & ((1 << bits) - 1)) << shift;
        }
        Ok(self.words)
    }

    /// The program as little-endian bytes.
    pub fn bytes(words: &[u32]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// MOVZ Xd, #imm16, LSL #(16 * hw).
    pub fn movz(&mut self, rd: Reg, imm16: u16, hw: u32) {
        self.word(0xd280_0000 | (hw << 21) | (u32::from(imm16) << 5) | rd);
    }

    /// MOVK Xd, #imm16, LSL #(16 * hw).
    pub fn movk(&mut self, rd: Reg, imm16: u16, hw: u32) {
        self.word(0xf280_0000 | (hw << 21) | (u32::from(imm16) << 5) | rd);
    }

    /// Xd = `value`: MOVZ then a MOVK for each other nonzero halfword.
    pub fn mov_imm(&mut self, rd: Reg, value: u64) {
        self.movz(rd, value as u16, 0);
        for hw in 1..4 {
            let half = (value >> (16 * hw)) as u16;
            if half != 0 {
                self.movk(rd, half, hw);
            }
        }
    }

    /// MOV Xd, Xm (ORR Xd, XZR, Xm).
    pub fn mov(&mut self, rd: Reg, rm: Reg) {
        self.word(0xaa00_03e0 | (rm << 16) | rd);
    }

    fn scaled(&mut self, imm: u64) -> u32 {
        if imm % 8 != 0 || imm / 8 > 0xfff {
            self.error.get_or_insert(AsmError::Immediate(imm));
            return 0;
        }
        (imm / 8) as u32
    }

    /// `LDR Xt, [Xn, #imm]` (unsigned offset, a multiple of 8 below 32 KiB).
    pub fn ldr(&mut self, rt: Reg, rn: Reg, imm: u64) {
        let imm12 = self.scaled(imm);
        self.word(0xf940_0000 | (imm12 << 10) | (rn << 5) | rt);
    }

    /// `STR Xt, [Xn, #imm]` (unsigned offset, a multiple of 8 below 32 KiB).
    pub fn str(&mut self, rt: Reg, rn: Reg, imm: u64) {
        let imm12 = self.scaled(imm);
        self.word(0xf900_0000 | (imm12 << 10) | (rn << 5) | rt);
    }

    /// `LDTR Xt, [Xn]`: a load with EL0's permissions.
    pub fn ldtr(&mut self, rt: Reg, rn: Reg) {
        self.word(0xf840_0800 | (rn << 5) | rt);
    }

    /// `STTR Xt, [Xn]`: a store with EL0's permissions.
    pub fn sttr(&mut self, rt: Reg, rn: Reg) {
        self.word(0xf800_0800 | (rn << 5) | rt);
    }

    fn imm12(&mut self, imm: u64) -> u32 {
        if imm > 0xfff {
            self.error.get_or_insert(AsmError::Immediate(imm));
            return 0;
        }
        imm as u32
    }

    /// ADD Xd, Xn, #imm12.
    pub fn add_imm(&mut self, rd: Reg, rn: Reg, imm: u64) {
        let imm12 = self.imm12(imm);
        self.word(0x9100_0000 | (imm12 << 10) | (rn << 5) | rd);
    }

    /// SUBS Xd, Xn, #imm12 (CMP Xn, #imm12 with `rd` = XZR).
    pub fn subs_imm(&mut self, rd: Reg, rn: Reg, imm: u64) {
        let imm12 = self.imm12(imm);
        self.word(0xf100_0000 | (imm12 << 10) | (rn << 5) | rd);
    }

    /// CMP Xn, #imm12.
    pub fn cmp_imm(&mut self, rn: Reg, imm: u64) {
        self.subs_imm(XZR, rn, imm);
    }

    /// B label.
    pub fn b(&mut self, l: Label) {
        self.branch(0x1400_0000, l, Fixup::Imm26);
    }

    /// B.cond label.
    pub fn b_cond(&mut self, cond: Cond, l: Label) {
        self.branch(0x5400_0000 | cond as u32, l, Fixup::Imm19);
    }

    /// CBZ Xt, label.
    pub fn cbz(&mut self, rt: Reg, l: Label) {
        self.branch(0xb400_0000 | rt, l, Fixup::Imm19);
    }

    /// CBNZ Xt, label.
    pub fn cbnz(&mut self, rt: Reg, l: Label) {
        self.branch(0xb500_0000 | rt, l, Fixup::Imm19);
    }

    /// BLR Xn: call, with the return address in X30.
    pub fn blr(&mut self, rn: Reg) {
        self.word(0xd63f_0000 | (rn << 5));
    }

    /// RET (to X30).
    pub fn ret(&mut self) {
        self.word(0xd65f_03c0);
    }

    /// LSR Xd, Xn, #shift (UBFM Xd, Xn, #shift, #63).
    pub fn lsr_imm(&mut self, rd: Reg, rn: Reg, shift: u32) {
        let shift = if shift > 63 {
            self.error
                .get_or_insert(AsmError::Immediate(u64::from(shift)));
            0
        } else {
            shift
        };
        self.word(0xd340_fc00 | (shift << 16) | (rn << 5) | rd);
    }

    /// LSL Xd, Xn, #shift (UBFM Xd, Xn, #(-shift MOD 64), #(63 - shift)).
    pub fn lsl_imm(&mut self, rd: Reg, rn: Reg, shift: u32) {
        let shift = if shift > 63 {
            self.error
                .get_or_insert(AsmError::Immediate(u64::from(shift)));
            0
        } else {
            shift
        };
        let (immr, imms) = ((64 - shift) % 64, 63 - shift);
        self.word(0xd340_0000 | (immr << 16) | (imms << 10) | (rn << 5) | rd);
    }

    /// BR Xn.
    pub fn br(&mut self, rn: Reg) {
        self.word(0xd61f_0000 | (rn << 5));
    }

    /// MSR sysreg, Xt.
    pub fn msr(&mut self, reg: SysReg, rt: Reg) {
        self.word(0xd510_0000 | reg.bits() | rt);
    }

    /// MRS Xt, sysreg.
    pub fn mrs(&mut self, rt: Reg, reg: SysReg) {
        self.word(0xd530_0000 | reg.bits() | rt);
    }

    /// MSR PAN, #imm: sets PSTATE.PAN (FEAT_PAN) to `pan`.
    pub fn msr_pan(&mut self, pan: bool) {
        self.word(0xd500_409f | (u32::from(pan) << 8));
    }

    /// TLBI VMALLE1: every stage-1 EL1&0 translation of this PE.
    pub fn tlbi_vmalle1(&mut self) {
        self.word(0xd508_871f);
    }

    /// TLBI VMALLS12E1: every stage-1 and stage-2 EL1&0 translation of the current VMID.
    pub fn tlbi_vmalls12e1(&mut self) {
        self.word(0xd50c_87df);
    }

    /// DSB SY.
    pub fn dsb_sy(&mut self) {
        self.word(0xd503_3f9f);
    }

    /// ISB.
    pub fn isb(&mut self) {
        self.word(0xd503_3fdf);
    }

    /// ERET.
    pub fn eret(&mut self) {
        self.word(0xd69f_03e0);
    }

    /// BTI c (HINT #34): a valid target of BLR in a guarded page (FEAT_BTI); a NOP
    /// elsewhere.
    pub fn bti_c(&mut self) {
        self.word(0xd503_245f);
    }

    /// SVC #imm16.
    pub fn svc(&mut self, imm16: u16) {
        self.word(0xd400_0001 | (u32::from(imm16) << 5));
    }

    /// HVC #imm16.
    pub fn hvc(&mut self, imm16: u16) {
        self.word(0xd400_0002 | (u32::from(imm16) << 5));
    }

    /// NOP.
    pub fn nop(&mut self) {
        self.word(0xd503_201f);
    }

    /// HLT #imm16 (HLT #0xf000 is the A64 semihosting call).
    pub fn hlt(&mut self, imm16: u16) {
        self.word(0xd440_0000 | (u32::from(imm16) << 5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodings as LLVM 14 assembles them (`llvm-mc -triple=aarch64 -mattr=+v8.1a`, then
    /// `llvm-objdump -d`).
    #[test]
    fn matches_known_encodings() {
        let mut a = Asm::new();
        a.movz(0, 0x1234, 0); // mov x0, #0x1234
        a.movk(0, 0x4000, 1); // movk x0, #0x4000, lsl #16
        a.movk(5, 0xffff, 3); // movk x5, #0xffff, lsl #48
        a.mov(1, 2); // mov x1, x2
        a.ldr(1, 0, 8); // ldr x1, [x0, #8]
        a.str(0, 1, 0); // str x0, [x1]
        a.str(3, 20, 24); // str x3, [x20, #24]
        a.ldtr(0, 1); // ldtr x0, [x1]
        a.sttr(2, 0); // sttr x2, [x0]
        a.add_imm(19, 19, 32); // add x19, x19, #0x20
        a.subs_imm(21, 21, 1); // subs x21, x21, #0x1
        a.cmp_imm(1, 1); // cmp x1, #0x1
        a.br(0); // br x0
        a.msr(SysReg::SCTLR_EL1, 0); // msr sctlr_el1, x0
        a.mrs(0, SysReg::ESR_EL1); // mrs x0, esr_el1
        a.msr(SysReg::TCR_EL1, 1); // msr tcr_el1, x1
        a.msr(SysReg::TTBR0_EL1, 0); // msr ttbr0_el1, x0
        a.msr(SysReg::MAIR_EL1, 0); // msr mair_el1, x0
        a.msr(SysReg::VBAR_EL1, 0); // msr vbar_el1, x0
        a.mrs(1, SysReg::FAR_EL1); // mrs x1, far_el1
        a.mrs(2, SysReg::ELR_EL1); // mrs x2, elr_el1
        a.mrs(0, SysReg::ID_AA64MMFR1_EL1); // mrs x0, id_aa64mmfr1_el1
        a.tlbi_vmalle1();
        a.dsb_sy();
        a.isb();
        a.eret();
        a.nop();
        a.hlt(0xf000);
        a.msr_pan(true); // msr pan, #1
        a.msr_pan(false); // msr pan, #0
        a.blr(0); // blr x0
        a.lsr_imm(11, 9, 26); // lsr x11, x9, #26
        a.ret(); // ret
        a.mov(9, 30); // mov x9, x30
        a.bti_c(); // bti c (-mattr=+bti)
        a.svc(0); // svc #0
        a.msr(SysReg::SPSR_EL1, 24); // msr spsr_el1, x24
        a.lsl_imm(4, 4, 2); // lsl x4, x4, #2
        a.lsl_imm(3, 3, 62); // lsl x3, x3, #62
        a.hvc(0); // hvc #0
        a.msr(SysReg::VTTBR_EL2, 0); // msr vttbr_el2, x0
        a.msr(SysReg::VTCR_EL2, 2); // msr vtcr_el2, x2
        a.msr(SysReg::HCR_EL2, 0); // msr hcr_el2, x0
        a.msr(SysReg::VBAR_EL2, 0); // msr vbar_el2, x0
        a.mrs(9, SysReg::ESR_EL2); // mrs x9, esr_el2
        a.mrs(10, SysReg::FAR_EL2); // mrs x10, far_el2
        a.mrs(11, SysReg::HPFAR_EL2); // mrs x11, hpfar_el2
        a.msr(SysReg::ELR_EL2, 4); // msr elr_el2, x4
        a.msr(SysReg::SPSR_EL2, 4); // msr spsr_el2, x4
        a.tlbi_vmalls12e1(); // tlbi vmalls12e1
        a.mrs(0, SysReg::CURRENT_EL); // mrs x0, currentel
        assert_eq!(
            a.finish().unwrap(),
            [
                0xd282_4680,
                0xf2a8_0000,
                0xf2ff_ffe5,
                0xaa02_03e1,
                0xf940_0401,
                0xf900_0020,
                0xf900_0e83,
                0xf840_0820,
                0xf800_0802,
                0x9100_8273,
                0xf100_06b5,
                0xf100_043f,
                0xd61f_0000,
                0xd518_1000,
                0xd538_5200,
                0xd518_2041,
                0xd518_2000,
                0xd518_a200,
                0xd518_c000,
                0xd538_6001,
                0xd538_4022,
                0xd538_0720,
                0xd508_871f,
                0xd503_3f9f,
                0xd503_3fdf,
                0xd69f_03e0,
                0xd503_201f,
                0xd45e_0000,
                0xd500_419f,
                0xd500_409f,
                0xd63f_0000,
                0xd35a_fd2b,
                0xd65f_03c0,
                0xaa1e_03e9,
                0xd503_245f,
                0xd400_0001,
                0xd518_4018,
                0xd37e_f484,
                0xd342_0463,
                0xd400_0002,
                0xd51c_2100,
                0xd51c_2142,
                0xd51c_1100,
                0xd51c_c000,
                0xd53c_5209,
                0xd53c_600a,
                0xd53c_608b,
                0xd51c_4024,
                0xd51c_4004,
                0xd50c_87df,
                0xd538_4240,
            ]
        );
    }

    #[test]
    fn branches_resolve_both_ways() {
        let mut a = Asm::new();
        let top = a.label();
        let end = a.label();
        a.bind(top);
        a.nop();
        a.cbz(3, end); // cbz x3, +12
        a.b_cond(Cond::Ne, top); // b.ne -8
        a.b(end); // b +4
        a.bind(end);
        a.cbnz(0, top); // cbnz x0, -16
        a.b(top); // b -20
        assert_eq!(
            a.finish().unwrap(),
            [
                0xd503_201f,
                0xb400_0063,
                0x54ff_ffc1,
                0x1400_0001,
                0xb5ff_ff80,
                0x17ff_fffb
            ]
        );
    }

    #[test]
    fn errors_are_reported() {
        let mut a = Asm::new();
        let l = a.label();
        a.b(l);
        assert_eq!(a.finish(), Err(AsmError::Unbound(0)));
        let mut a = Asm::new();
        a.ldr(0, 1, 12);
        assert_eq!(a.finish(), Err(AsmError::Immediate(12)));
        let mut a = Asm::new();
        a.add_imm(0, 0, 0x1000);
        assert_eq!(a.finish(), Err(AsmError::Immediate(0x1000)));
        let mut a = Asm::new();
        let l = a.label();
        a.bind(l);
        a.bind(l);
        assert_eq!(a.finish(), Err(AsmError::Rebound(0)));
        let mut a = Asm::new();
        a.nop();
        a.pad_to(0);
        assert_eq!(a.finish(), Err(AsmError::Immediate(0)));
        let mut a = Asm::new();
        a.mov_imm(4, 0xffff_ff80_4000_0000);
        assert_eq!(
            a.finish().unwrap(),
            [0xd280_0004, 0xf2a8_0004, 0xf2df_f004, 0xf2ff_ffe4]
        );
    }
}
