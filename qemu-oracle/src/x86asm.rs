//! A minimal x86-64 assembler for the x86 oracle's program: the few instructions it uses,
//! encoded as the Intel SDM vol. 2 (chapter 2, "Instruction Format", and the instruction
//! pages) gives them, with labels for `jmp`/`jcc` targets (rel32 only).
//!
//! Every instruction is the 64-bit-mode form unless its name ends in `32`; those few are
//! the ones the start-up code runs in 32-bit protected mode (and [`Asm::mov_imm32`] and the
//! control-register moves, which encode the same in both modes for RAX..RDI).

/// A general-purpose register, numbered as in ModRM/REX (RAX 0 … R15 15).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Reg {
    Rax = 0,
    Rcx,
    Rdx,
    Rbx,
    Rsp,
    Rbp,
    Rsi,
    Rdi,
    R8,
    R9,
    R10,
    R11,
    R12,
    R13,
    R14,
    R15,
}

impl Reg {
    const fn low(self) -> u8 {
        self as u8 & 7
    }

    const fn high(self) -> bool {
        self as u8 >= 8
    }
}

/// A segment register, numbered as in the `MOV Sreg` ModRM.reg field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Seg {
    Es = 0,
    Ss = 2,
    Ds = 3,
}

/// A `jcc` condition (the low nibble of the opcode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cond {
    /// ZF = 1.
    Equal = 4,
    /// ZF = 0.
    NotEqual = 5,
}

/// A jump target; bind it once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Label(usize);

/// Why assembling failed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AsmError {
    /// A label was used but never bound.
    #[error("label {0} used but never bound")]
    Unbound(usize),
    /// A label was bound twice.
    #[error("label {0} bound twice")]
    Rebound(usize),
    /// A jump does not reach its label with a 32-bit displacement.
    #[error("jump at {0:#x} does not reach its label")]
    OutOfRange(usize),
    /// The addressing form is not one this assembler encodes.
    #[error("unsupported operand: {0}")]
    Unsupported(&'static str),
    /// [`Asm::pad_to`] was asked to go backwards.
    #[error("already at {at:#x}, past {to:#x}")]
    Overrun {
        /// Where the code is.
        at: usize,
        /// Where padding should have reached.
        to: usize,
    },
}

/// The assembler: code bytes, labels and the rel32 fields still to fill.
#[derive(Debug, Default)]
pub struct Asm {
    code: Vec<u8>,
    labels: Vec<Option<usize>>,
    /// (position of the rel32 field, label); the displacement counts from the field's end.
    fixups: Vec<(usize, Label)>,
    error: Option<AsmError>,
}

const REX_W: u8 = 0x48;

impl Asm {
    /// An empty program.
    pub fn new() -> Self {
        Self::default()
    }

    /// The offset of the next byte.
    pub fn offset(&self) -> usize {
        self.code.len()
    }

    /// A new, unbound label.
    pub fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    /// Binds `l` to the current offset.
    pub fn bind(&mut self, l: Label) {
        match self.labels[l.0] {
            Some(_) => self.fail(AsmError::Rebound(l.0)),
            None => self.labels[l.0] = Some(self.code.len()),
        }
    }

    /// The offset `l` is bound to, if it is.
    pub fn bound(&self, l: Label) -> Option<usize> {
        self.labels.get(l.0).copied().flatten()
    }

    fn fail(&mut self, e: AsmError) {
        self.error.get_or_insert(e);
    }

    /// Raw bytes.
    pub fn bytes(&mut self, b: &[u8]) {
        self.code.extend_from_slice(b);
    }

    /// `fill` bytes up to offset `to`.
    pub fn pad_to(&mut self, to: usize, fill: u8) {
        if to < self.code.len() {
            self.fail(AsmError::Overrun {
                at: self.code.len(),
                to,
            });
        } else {
            self.code.resize(to, fill);
        }
    }

    /// The code, with every jump resolved.
    pub fn finish(mut self) -> Result<Vec<u8>, AsmError> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        for &(at, l) in &self.fixups {
            let target = self.labels[l.0].ok_or(AsmError::Unbound(l.0))?;
            let rel = i32::try_from(target as i64 - (at as i64 + 4))
                .map_err(|_| AsmError::OutOfRange(at))?;
            self.code[at..at + 4].copy_from_slice(&rel.to_le_bytes());
        }
        Ok(self.code)
    }

    fn rex(&mut self, w: bool, reg: bool, base: bool) {
        let rex = 0x40 | (u8::from(w) << 3) | (u8::from(reg) << 2) | u8::from(base);
        if rex != 0x40 {
            self.code.push(rex);
        }
    }

    fn modrm(&mut self, md: u8, reg: u8, rm: u8) {
        self.code.push((md << 6) | ((reg & 7) << 3) | (rm & 7));
    }

    /// A 64-bit register-to-register instruction: REX.W, `op`, ModRM (mod 11, reg, rm).
    fn rr(&mut self, op: u8, reg: Reg, rm: Reg) {
        self.rex(true, reg.high(), rm.high());
        self.code.push(op);
        self.modrm(3, reg.low(), rm.low());
    }

    /// A 64-bit memory instruction `[base + disp32]` (mod 10; a SIB byte for RSP/R12).
    fn mem(&mut self, op: u8, reg: Reg, base: Reg, disp: i32) {
        self.rex(true, reg.high(), base.high());
        self.code.push(op);
        self.modrm(2, reg.low(), base.low());
        if base.low() == 4 {
            self.code.push(0x24); // SIB: no index, base = RSP/R12
        }
        self.code.extend_from_slice(&disp.to_le_bytes());
    }

    /// `mov r64, imm64` (REX.W B8+r).
    pub fn mov_imm64(&mut self, r: Reg, imm: u64) {
        self.rex(true, false, r.high());
        self.code.push(0xb8 + r.low());
        self.code.extend_from_slice(&imm.to_le_bytes());
    }

    /// `mov r32, imm32` (B8+r): zero-extends in 64-bit mode.
    pub fn mov_imm32(&mut self, r: Reg, imm: u32) {
        self.rex(false, false, r.high());
        self.code.push(0xb8 + r.low());
        self.code.extend_from_slice(&imm.to_le_bytes());
    }

    /// `mov dst, src` (REX.W 89 /r).
    pub fn mov(&mut self, dst: Reg, src: Reg) {
        self.rr(0x89, src, dst);
    }

    /// `mov dst, [base + disp]` (REX.W 8B /r).
    pub fn load(&mut self, dst: Reg, base: Reg, disp: i32) {
        self.mem(0x8b, dst, base, disp);
    }

    /// `mov [base + disp], src` (REX.W 89 /r).
    pub fn store(&mut self, base: Reg, disp: i32, src: Reg) {
        self.mem(0x89, src, base, disp);
    }

    /// `add dst, src` (REX.W 01 /r).
    pub fn add(&mut self, dst: Reg, src: Reg) {
        self.rr(0x01, src, dst);
    }

    /// `test a, b` (REX.W 85 /r).
    pub fn test(&mut self, a: Reg, b: Reg) {
        self.rr(0x85, b, a);
    }

    /// A group-1 operation with a sign-extended imm32 (REX.W 81 /ext id).
    fn group1(&mut self, ext: u8, r: Reg, imm: i32) {
        self.rex(true, false, r.high());
        self.code.push(0x81);
        self.modrm(3, ext, r.low());
        self.code.extend_from_slice(&imm.to_le_bytes());
    }

    /// `add r, imm32` (REX.W 81 /0).
    pub fn add_imm(&mut self, r: Reg, imm: i32) {
        self.group1(0, r, imm);
    }

    /// `sub r, imm32` (REX.W 81 /5).
    pub fn sub_imm(&mut self, r: Reg, imm: i32) {
        self.group1(5, r, imm);
    }

    /// `cmp r, imm32` (REX.W 81 /7).
    pub fn cmp_imm(&mut self, r: Reg, imm: i32) {
        self.group1(7, r, imm);
    }

    fn rel32(&mut self, l: Label) {
        self.fixups.push((self.code.len(), l));
        self.code.extend_from_slice(&[0; 4]);
    }

    /// `jmp rel32` (E9 cd).
    pub fn jmp(&mut self, l: Label) {
        self.code.push(0xe9);
        self.rel32(l);
    }

    /// `jcc rel32` (0F 80+cc cd).
    pub fn jcc(&mut self, c: Cond, l: Label) {
        self.code.extend_from_slice(&[0x0f, 0x80 + c as u8]);
        self.rel32(l);
    }

    /// `jmp r64` (FF /4).
    pub fn jmp_reg(&mut self, r: Reg) {
        self.rex(false, false, r.high());
        self.code.push(0xff);
        self.modrm(3, 4, r.low());
    }

    /// `call r64` (FF /2).
    pub fn call_reg(&mut self, r: Reg) {
        self.rex(false, false, r.high());
        self.code.push(0xff);
        self.modrm(3, 2, r.low());
    }

    /// `push r64` (50+r).
    pub fn push(&mut self, r: Reg) {
        self.rex(false, false, r.high());
        self.code.push(0x50 + r.low());
    }

    /// `pop r64` (58+r).
    pub fn pop(&mut self, r: Reg) {
        self.rex(false, false, r.high());
        self.code.push(0x58 + r.low());
    }

    /// `push imm8`, sign-extended to 64 bits (6A ib).
    pub fn push_imm8(&mut self, imm: i8) {
        self.code.extend_from_slice(&[0x6a, imm as u8]);
    }

    /// `mov crN, r` (0F 22 /r).
    pub fn mov_to_cr(&mut self, cr: u8, r: Reg) {
        self.rex(false, false, r.high());
        self.code.extend_from_slice(&[0x0f, 0x22]);
        self.modrm(3, cr, r.low());
    }

    /// `mov r, crN` (0F 20 /r).
    pub fn mov_from_cr(&mut self, r: Reg, cr: u8) {
        self.rex(false, false, r.high());
        self.code.extend_from_slice(&[0x0f, 0x20]);
        self.modrm(3, cr, r.low());
    }

    /// `mov sreg, r32` (8E /r).
    pub fn mov_to_seg(&mut self, s: Seg, r: Reg) {
        self.rex(false, false, r.high());
        self.code.push(0x8e);
        self.modrm(3, s as u8, r.low());
    }

    /// A system-table load `[r]` (0F 01 /ext, mod 00): only registers that need neither a
    /// SIB byte nor a displacement.
    fn table_load(&mut self, ext: u8, r: Reg) {
        if matches!(r.low(), 4 | 5) {
            self.fail(AsmError::Unsupported(
                "lgdt/lidt through RSP, RBP, R12 or R13",
            ));
            return;
        }
        self.rex(false, false, r.high());
        self.code.extend_from_slice(&[0x0f, 0x01]);
        self.modrm(0, ext, r.low());
    }

    /// `lgdt [r]` (0F 01 /2): 6 bytes of limit and base in 32-bit mode, 10 in 64-bit mode.
    pub fn lgdt(&mut self, r: Reg) {
        self.table_load(2, r);
    }

    /// `lidt [r]` (0F 01 /3).
    pub fn lidt(&mut self, r: Reg) {
        self.table_load(3, r);
    }

    /// `ltr r16` (0F 00 /3).
    pub fn ltr(&mut self, r: Reg) {
        self.rex(false, false, r.high());
        self.code.extend_from_slice(&[0x0f, 0x00]);
        self.modrm(3, 3, r.low());
    }

    /// `wrmsr` (0F 30): MSR\[ECX\] = EDX:EAX.
    pub fn wrmsr(&mut self) {
        self.code.extend_from_slice(&[0x0f, 0x30]);
    }

    /// `cpuid` (0F A2).
    pub fn cpuid(&mut self) {
        self.code.extend_from_slice(&[0x0f, 0xa2]);
    }

    /// `hlt` (F4).
    pub fn hlt(&mut self) {
        self.code.push(0xf4);
    }

    /// `iretq` (REX.W CF).
    pub fn iretq(&mut self) {
        self.code.extend_from_slice(&[REX_W, 0xcf]);
    }

    /// `int imm8` (CD ib).
    pub fn int(&mut self, vector: u8) {
        self.code.extend_from_slice(&[0xcd, vector]);
    }

    /// `out imm8, al` (E6 ib).
    pub fn out_al(&mut self, port: u8) {
        self.code.extend_from_slice(&[0xe6, port]);
    }

    /// `ljmp selector:offset` in 32-bit protected mode (EA cd cw).
    pub fn ljmp32(&mut self, selector: u16, offset: u32) {
        self.code.push(0xea);
        self.code.extend_from_slice(&offset.to_le_bytes());
        self.code.extend_from_slice(&selector.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::Reg::*;
    use super::*;

    fn one(f: impl FnOnce(&mut Asm)) -> Vec<u8> {
        let mut a = Asm::new();
        f(&mut a);
        a.finish().unwrap()
    }

    // The expected bytes are what `objdump -M intel` (binutils 2.40) decodes as the
    // instruction in the comment. Memory operands always take a disp32 and group-1
    // immediates an imm32 here, where GNU as would pick the shorter disp8/imm8 forms.
    #[test]
    fn moves_encode_as_the_sdm_gives_them() {
        // movabs rax, 0x1122334455667788 / movabs r15, ...
        assert_eq!(
            one(|a| a.mov_imm64(Rax, 0x1122_3344_5566_7788)),
            [0x48, 0xb8, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]
        );
        assert_eq!(one(|a| a.mov_imm64(R15, 1))[..2], [0x49, 0xbf]);
        // mov ecx, 0xc0000080 / mov r9d, 5
        assert_eq!(
            one(|a| a.mov_imm32(Rcx, 0xc000_0080)),
            [0xb9, 0x80, 0x00, 0x00, 0xc0]
        );
        assert_eq!(one(|a| a.mov_imm32(R9, 5)), [0x41, 0xb9, 5, 0, 0, 0]);
        // mov r12, r15 / mov rdi, rax
        assert_eq!(one(|a| a.mov(R12, R15)), [0x4d, 0x89, 0xfc]);
        assert_eq!(one(|a| a.mov(Rdi, Rax)), [0x48, 0x89, 0xc7]);
        // mov rax, [r12+0x20] / mov r8, [r12+0x10] / mov [r13+0x8], rax / mov [rcx+0], rdx
        assert_eq!(
            one(|a| a.load(Rax, R12, 0x20)),
            [0x49, 0x8b, 0x84, 0x24, 0x20, 0, 0, 0]
        );
        assert_eq!(
            one(|a| a.load(R8, R12, 0x10)),
            [0x4d, 0x8b, 0x84, 0x24, 0x10, 0, 0, 0]
        );
        assert_eq!(
            one(|a| a.store(R13, 8, Rax)),
            [0x49, 0x89, 0x85, 8, 0, 0, 0]
        );
        assert_eq!(
            one(|a| a.store(Rcx, 0, Rdx)),
            [0x48, 0x89, 0x91, 0, 0, 0, 0]
        );
        // mov rax, [rdi+0]
        assert_eq!(one(|a| a.load(Rax, Rdi, 0)), [0x48, 0x8b, 0x87, 0, 0, 0, 0]);
        // mov cr3, rax / mov cr0, rax / mov rax, cr2 / mov cr4, r9
        assert_eq!(one(|a| a.mov_to_cr(3, Rax)), [0x0f, 0x22, 0xd8]);
        assert_eq!(one(|a| a.mov_to_cr(0, Rax)), [0x0f, 0x22, 0xc0]);
        assert_eq!(one(|a| a.mov_from_cr(Rax, 2)), [0x0f, 0x20, 0xd0]);
        assert_eq!(one(|a| a.mov_to_cr(4, R9)), [0x41, 0x0f, 0x22, 0xe1]);
        // mov ds, eax / mov ss, eax
        assert_eq!(one(|a| a.mov_to_seg(Seg::Ds, Rax)), [0x8e, 0xd8]);
        assert_eq!(one(|a| a.mov_to_seg(Seg::Ss, Rax)), [0x8e, 0xd0]);
    }

    #[test]
    fn arithmetic_and_control_flow_encode_as_the_sdm_gives_them() {
        // add r12, 0x80 / sub r14, 1 / cmp rsi, 2 / add rcx, r15 / test rcx, rcx
        assert_eq!(
            one(|a| a.add_imm(R12, 0x80)),
            [0x49, 0x81, 0xc4, 0x80, 0, 0, 0]
        );
        assert_eq!(one(|a| a.sub_imm(R14, 1)), [0x49, 0x81, 0xee, 1, 0, 0, 0]);
        assert_eq!(one(|a| a.cmp_imm(Rsi, 2)), [0x48, 0x81, 0xfe, 2, 0, 0, 0]);
        assert_eq!(one(|a| a.add(Rcx, R15)), [0x4c, 0x01, 0xf9]);
        assert_eq!(one(|a| a.test(Rcx, Rcx)), [0x48, 0x85, 0xc9]);
        // jmp rcx / call rdi / jmp r10 / push rcx / push r9 / pop rdx / push 0x30
        assert_eq!(one(|a| a.jmp_reg(Rcx)), [0xff, 0xe1]);
        assert_eq!(one(|a| a.call_reg(Rdi)), [0xff, 0xd7]);
        assert_eq!(one(|a| a.jmp_reg(R10)), [0x41, 0xff, 0xe2]);
        assert_eq!(one(|a| a.push(Rcx)), [0x51]);
        assert_eq!(one(|a| a.push(R9)), [0x41, 0x51]);
        assert_eq!(one(|a| a.pop(Rdx)), [0x5a]);
        assert_eq!(one(|a| a.push_imm8(0x30)), [0x6a, 0x30]);
        // lgdt [rax] / lidt [rax] / ltr ax / wrmsr / cpuid / iretq / int 0x30 / out 0xf4, al
        assert_eq!(one(|a| a.lgdt(Rax)), [0x0f, 0x01, 0x10]);
        assert_eq!(one(|a| a.lidt(Rax)), [0x0f, 0x01, 0x18]);
        assert_eq!(one(|a| a.ltr(Rax)), [0x0f, 0x00, 0xd8]);
        assert_eq!(one(|a| a.wrmsr()), [0x0f, 0x30]);
        assert_eq!(one(|a| a.cpuid()), [0x0f, 0xa2]);
        assert_eq!(one(|a| a.iretq()), [0x48, 0xcf]);
        assert_eq!(one(|a| a.int(0x30)), [0xcd, 0x30]);
        assert_eq!(one(|a| a.out_al(0xf4)), [0xe6, 0xf4]);
        // ljmp $0x8, $0x200040 (32-bit code)
        assert_eq!(
            one(|a| a.ljmp32(8, 0x20_0040)),
            [0xea, 0x40, 0x00, 0x20, 0x00, 0x08, 0x00]
        );
    }

    #[test]
    fn jumps_reach_their_labels_forwards_and_backwards() {
        let mut a = Asm::new();
        let (back, fwd) = (a.label(), a.label());
        a.bind(back);
        a.hlt();
        a.jcc(Cond::Equal, fwd); // at 1: 0F 84 rel32 (ends at 7)
        a.jmp(back); // at 7: E9 rel32 (ends at 12)
        a.jcc(Cond::NotEqual, back); // at 12: ends at 18
        a.bind(fwd);
        let code = a.finish().unwrap();
        assert_eq!(&code[1..7], &[0x0f, 0x84, 11, 0, 0, 0]);
        assert_eq!(&code[7..12], &[0xe9, 0xf4, 0xff, 0xff, 0xff]); // -12
        assert_eq!(&code[12..18], &[0x0f, 0x85, 0xee, 0xff, 0xff, 0xff]); // -18
    }

    #[test]
    fn mistakes_are_errors_not_bad_code() {
        let mut a = Asm::new();
        let l = a.label();
        a.jmp(l);
        assert_eq!(a.finish(), Err(AsmError::Unbound(0)));
        let mut a = Asm::new();
        let l = a.label();
        a.bind(l);
        a.bind(l);
        assert_eq!(a.finish(), Err(AsmError::Rebound(0)));
        let mut a = Asm::new();
        a.lgdt(R13);
        assert!(matches!(a.finish(), Err(AsmError::Unsupported(_))));
        let mut a = Asm::new();
        a.hlt();
        a.hlt();
        a.pad_to(1, 0);
        assert_eq!(a.finish(), Err(AsmError::Overrun { at: 2, to: 1 }));
    }
}
