//! The guest image: hand-assembled x86-64 code, descriptor tables and the harness layout.
//!
//! The harness lives in the top-level slot 511 of every page table the oracle runs on, so
//! the same linear addresses work with 4-level and 5-level paging (with LA57 the address
//! below selects PML5 entry 511, then PML4 entry 511). Probe addresses must stay out of
//! that slot. Every piece of the harness has its own 4 KiB frame below
//! [`FIRST_FREE_GPA`]; the test maps them with vsva's table builder, as listed in
//! [`HARNESS_PAGES`].

use std::ops::Range;

use crate::PagingMode;

/// Linear base of the harness: top-level index 511 in 4-level and in 5-level paging.
pub const HARNESS_BASE: u64 = 0xffff_ff80_0000_0000;

/// Top-level table index that holds the harness (PML4 or PML5 index 511).
pub const HARNESS_TOP_INDEX: u64 = 511;

/// The range Linux's x86-64 memory map reserves for hypervisors (the "guard hole" at the
/// bottom of the upper half), for each paging mode. KVM's PVM backend keeps mappings of its
/// own there and answers ring-3 accesses with arbitrary faults, so probes stay out of it.
pub const fn hypervisor_hole(mode: PagingMode) -> Range<u64> {
    match mode {
        PagingMode::Level4 => 0xffff_8000_0000_0000..0xffff_8800_0000_0000,
        PagingMode::Level5 => 0xff00_0000_0000_0000..0xff10_0000_0000_0000,
    }
}

/// Guest-physical memory below this address belongs to the harness.
pub const FIRST_FREE_GPA: u64 = 1 << 20;

/// Port written by the page-fault handler (error code in RBX, CR2 in RAX).
pub const PORT_PAGE_FAULT: u16 = 0xee;
/// Port written by every other exception handler (vector in RCX).
pub const PORT_EXCEPTION: u16 = 0xef;

/// Code segment selector of ring 0.
pub const KERNEL_CS: u16 = 0x08;
/// Data/stack segment selector of ring 0.
pub const KERNEL_DS: u16 = 0x10;
/// Code segment selector of ring 3 (RPL 3).
pub const USER_CS: u16 = 0x1b;
/// Data/stack segment selector of ring 3 (RPL 3).
pub const USER_DS: u16 = 0x23;
/// Task-state segment selector.
pub const TSS_SELECTOR: u16 = 0x28;

/// RFLAGS for user-mode probes: reserved bit 1 only (IF clear, IOPL 0).
pub const USER_RFLAGS: u64 = 0x2;

/// Guest-physical address of the report page: outside RAM, so a store there is an MMIO
/// exit to the host at any privilege. (Ring 3 reports by MMIO rather than by `out` or a
/// software interrupt: KVM backends that emulate `iretq`/`int n`, as PVM does, lose IOPL
/// and reject `int n` outside real mode.)
pub const REPORT_GPA: u64 = 0x8_0000_0000;
/// Offset in the report page that a read or write probe stores to when it completed
/// (a read stores the value it read).
pub const REPORT_DONE: u64 = 0;
/// Offset in the report page that the execute-probe snippet stores its token to.
pub const REPORT_EXEC: u64 = 8;

/// One 4 KiB page of the harness.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HarnessPage {
    /// Linear address of the page.
    pub va: u64,
    /// Guest-physical address of the frame behind it (outside RAM for [`REPORT`]).
    pub gpa: u64,
    /// Reachable from ring 3 (U/S = 1 in the leaf entry; the harness's upper entries
    /// must allow user access).
    pub user: bool,
    /// Writable (R/W = 1).
    pub writable: bool,
    /// Executable (XD = 0).
    pub executable: bool,
}

const fn page(index: u64, user: bool, writable: bool, executable: bool) -> HarnessPage {
    HarnessPage {
        va: HARNESS_BASE + index * 4096,
        gpa: if index == REPORT_INDEX {
            REPORT_GPA
        } else {
            0x1000 + index * 4096
        },
        user,
        writable,
        executable,
    }
}

/// Kernel code: the probe entry, the supervisor access stub and the exception handlers.
pub const KERNEL_CODE: HarnessPage = page(0, false, false, true);
/// GDT (offset 0) and TSS (offset [`TSS_OFFSET`]).
pub const DESCRIPTORS: HarnessPage = page(1, false, true, false);
/// Interrupt descriptor table.
pub const IDT: HarnessPage = page(2, false, false, false);
/// Ring-0 stack (the TSS's RSP0 points at its top).
pub const KERNEL_STACK: HarnessPage = page(3, false, true, false);
/// The user-mode access stub.
pub const USER_CODE: HarnessPage = page(4, true, false, true);
/// Ring-3 stack pointer target (the stub itself uses no stack).
pub const USER_STACK: HarnessPage = page(5, true, true, false);
const REPORT_INDEX: u64 = 6;
/// The report page (MMIO, see [`REPORT_GPA`]); RBX points at it during a probe.
pub const REPORT: HarnessPage = page(REPORT_INDEX, true, true, false);

/// Every harness page.
pub const HARNESS_PAGES: [HarnessPage; 7] = [
    KERNEL_CODE,
    DESCRIPTORS,
    IDT,
    KERNEL_STACK,
    USER_CODE,
    USER_STACK,
    REPORT,
];

/// Offset of the TSS in the [`DESCRIPTORS`] page.
pub const TSS_OFFSET: u64 = 0x800;
/// Number of GDT entries (the 64-bit TSS descriptor takes two).
pub const GDT_ENTRIES: u64 = 7;
/// Vectors with a handler: the exceptions.
pub const IDT_VECTORS: u64 = 32;
/// Offset of the supervisor access stub in [`KERNEL_CODE`].
pub const SUPERVISOR_STUB_OFFSET: u64 = 0x40;
/// Offset of the first exception handler in [`KERNEL_CODE`]; handler `v` is at
/// `HANDLERS_OFFSET + HANDLER_SIZE * v`.
pub const HANDLERS_OFFSET: u64 = 0x100;
/// Size of each exception handler.
pub const HANDLER_SIZE: u64 = 32;

/// Probe operation codes passed in RSI.
pub const OP_READ: u64 = 0;
/// Write probe: stores R8 at RDI.
pub const OP_WRITE: u64 = 1;
/// Execute probe: jumps to RDI.
pub const OP_EXECUTE: u64 = 2;

/// Probe entry, run in ring 0 with RCX = CR3, RDX = 1 for a user probe, R9 = user RSP,
/// R10 = access stub, RBX = the report page. It reloads CR3 (flushing every non-global translation and the
/// paging-structure caches: CR4.PGE and PCIDE stay clear), then jumps to the stub
/// directly or through `iretq` into ring 3.
pub const ENTRY: [u8; 25] = [
    0x0f,
    0x22,
    0xd9, // mov cr3, rcx
    0x85,
    0xd2, // test edx, edx
    0x75,
    0x03, // jnz user
    0x41,
    0xff,
    0xe2, // jmp r10
    // user:
    0x6a,
    USER_DS as u8, // push USER_DS
    0x41,
    0x51, // push r9
    0x68,
    USER_RFLAGS as u8,
    0x00,
    0x00,
    0x00, // push USER_RFLAGS
    0x6a,
    USER_CS as u8, // push USER_CS
    0x41,
    0x52, // push r10
    0x48,
    0xcf, // iretq
];

/// Access stub, run at the probe's privilege with RDI = address, RSI = operation, R8 =
/// value to write, RBX = the report page. Reads and writes report at [`REPORT_DONE`]
/// (a read stores the value it read); an execute probe jumps to the address, where
/// [`exec_snippet`] reports.
pub const ACCESS_STUB: [u8; 25] = [
    0x83, 0xfe, 0x01, // cmp esi, OP_WRITE
    0x74, 0x0a, // je write
    0x77, 0x10, // ja execute
    0x48, 0x8b, 0x07, // mov rax, [rdi]
    0x48, 0x89, 0x03, // mov [rbx + REPORT_DONE], rax
    0xeb, 0xfe, // jmp $
    // write:
    0x4c, 0x89, 0x07, // mov [rdi], r8
    0x4c, 0x89, 0x03, // mov [rbx + REPORT_DONE], r8
    0xeb, 0xfe, // jmp $
    // execute:
    0xff, 0xe7, // jmp rdi
];

/// Code an execute probe expects at its target: loads `token` into RAX and stores it at
/// [`REPORT_EXEC`]. The probe address must leave room for it in its page.
pub fn exec_snippet(token: u64) -> [u8; EXEC_SNIPPET_LEN] {
    let mut code = [0u8; EXEC_SNIPPET_LEN];
    code[..2].copy_from_slice(&[0x48, 0xb8]); // mov rax, imm64
    code[2..10].copy_from_slice(&token.to_le_bytes());
    code[10..].copy_from_slice(&[
        0x48,
        0x89,
        0x43,
        REPORT_EXEC as u8, // mov [rbx + REPORT_EXEC], rax
        0xeb,
        0xfe, // jmp $
    ]);
    code
}

/// Length of [`exec_snippet`].
pub const EXEC_SNIPPET_LEN: usize = 16;

/// Exception handler for `vector`, run in ring 0: the page-fault handler pops the error
/// code into RBX, loads CR2 into RAX and reports on [`PORT_PAGE_FAULT`]; the others load
/// the vector into ECX and the top two words of the exception frame into RDX and RSI
/// (RIP then CS, or the error code then RIP) and report on [`PORT_EXCEPTION`]. None
/// returns: the host restarts the vCPU.
pub fn exception_handler(vector: u8) -> [u8; HANDLER_SIZE as usize] {
    let mut code = [0xf4; HANDLER_SIZE as usize];
    if vector == 14 {
        code[..8].copy_from_slice(&[
            0x5b, // pop rbx
            0x0f,
            0x20,
            0xd0, // mov rax, cr2
            0xe6,
            PORT_PAGE_FAULT as u8, // out PORT_PAGE_FAULT, al
            0xeb,
            0xfe, // jmp $
        ]);
    } else {
        code[..18].copy_from_slice(&[
            0xb9,
            vector,
            0,
            0,
            0, // mov ecx, vector
            0x48,
            0x8b,
            0x14,
            0x24, // mov rdx, [rsp]
            0x48,
            0x8b,
            0x74,
            0x24,
            0x08, // mov rsi, [rsp + 8]
            0xe6,
            PORT_EXCEPTION as u8, // out PORT_EXCEPTION, al
            0xeb,
            0xfe, // jmp $
        ]);
    }
    code
}

/// The contents of [`KERNEL_CODE`].
pub fn kernel_code_page() -> Vec<u8> {
    let mut page = vec![0xf4; 4096]; // hlt everywhere else
    page[..ENTRY.len()].copy_from_slice(&ENTRY);
    let stub = SUPERVISOR_STUB_OFFSET as usize;
    page[stub..stub + ACCESS_STUB.len()].copy_from_slice(&ACCESS_STUB);
    for vector in 0..IDT_VECTORS as u8 {
        let at = (HANDLERS_OFFSET + HANDLER_SIZE * u64::from(vector)) as usize;
        page[at..at + HANDLER_SIZE as usize].copy_from_slice(&exception_handler(vector));
    }
    page
}

/// The contents of [`USER_CODE`].
pub fn user_code_page() -> Vec<u8> {
    let mut page = vec![0xf4; 4096];
    page[..ACCESS_STUB.len()].copy_from_slice(&ACCESS_STUB);
    page
}

/// A code or data segment descriptor with the accessed bit preset (so the CPU never
/// writes the GDT).
const fn segment(code: bool, dpl: u64) -> u64 {
    let access = 0x80 | (dpl << 5) | 0x10 | if code { 0x0b } else { 0x03 };
    let flags = if code { 0xa } else { 0xc }; // G + L for code, G + D/B for data
    0xffff | (access << 40) | (0xf << 48) | (flags << 52)
}

/// The contents of [`DESCRIPTORS`]: GDT at offset 0, TSS at [`TSS_OFFSET`].
pub fn descriptors_page() -> Vec<u8> {
    let tss = DESCRIPTORS.va + TSS_OFFSET;
    let tss_low = 0x67
        | ((tss & 0xff_ffff) << 16)
        | (0x8b << 40) // present, busy 64-bit TSS
        | (((tss >> 24) & 0xff) << 56);
    let gdt: [u64; GDT_ENTRIES as usize] = [
        0,
        segment(true, 0),
        segment(false, 0),
        segment(true, 3),
        segment(false, 3),
        tss_low,
        tss >> 32,
    ];
    let mut page = vec![0u8; 4096];
    for (i, d) in gdt.iter().enumerate() {
        page[i * 8..i * 8 + 8].copy_from_slice(&d.to_le_bytes());
    }
    let t = TSS_OFFSET as usize;
    let rsp0 = KERNEL_STACK.va + 4096;
    page[t + 4..t + 12].copy_from_slice(&rsp0.to_le_bytes());
    page[t + 102..t + 104].copy_from_slice(&104u16.to_le_bytes()); // no I/O bitmap
    page
}

/// The contents of [`IDT`]: an interrupt gate per exception vector.
pub fn idt_page() -> Vec<u8> {
    let mut page = vec![0u8; 4096];
    for vector in 0..IDT_VECTORS {
        let handler = KERNEL_CODE.va + HANDLERS_OFFSET + HANDLER_SIZE * vector;
        let low = (handler & 0xffff)
            | (u64::from(KERNEL_CS) << 16)
            | (0x8e << 40) // present, DPL 0, 64-bit interrupt gate
            | (((handler >> 16) & 0xffff) << 48);
        let at = (vector * 16) as usize;
        page[at..at + 8].copy_from_slice(&low.to_le_bytes());
        page[at + 8..at + 16].copy_from_slice(&(handler >> 32).to_le_bytes());
    }
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypervisor_hole_is_one_top_level_slot_range_below_the_harness() {
        for mode in [PagingMode::Level4, PagingMode::Level5] {
            let hole = hypervisor_hole(mode);
            assert!(!hole.contains(&HARNESS_BASE));
            assert!(hole.start < hole.end && hole.end < HARNESS_BASE);
        }
        // 16 PML4 slots (8 TiB), from slot 256; 16 PML5 slots (4 PiB), from slot 256.
        let h4 = hypervisor_hole(PagingMode::Level4);
        assert_eq!(
            ((h4.start >> 39) & 511, (h4.end - h4.start) >> 39),
            (256, 16)
        );
        let h5 = hypervisor_hole(PagingMode::Level5);
        assert_eq!(
            ((h5.start >> 48) & 511, (h5.end - h5.start) >> 48),
            (256, 16)
        );
    }

    #[test]
    fn harness_stays_in_top_slot_and_below_free_memory() {
        for p in HARNESS_PAGES {
            assert_eq!((p.va >> 39) & 511, HARNESS_TOP_INDEX);
            assert_eq!(
                (p.va >> 48) & 511,
                HARNESS_TOP_INDEX,
                "PML5 index with LA57"
            );
            assert!(p == REPORT || (p.gpa + 4096 <= FIRST_FREE_GPA && p.gpa != 0));
        }
    }

    #[test]
    fn stub_branches_land_on_their_labels() {
        // je write: next ip 5 + 10 = 15 = mov [rdi], r8
        assert_eq!(&ACCESS_STUB[15..18], &[0x4c, 0x89, 0x07]);
        // ja execute: next ip 7 + 16 = 23 = jmp rdi
        assert_eq!(&ACCESS_STUB[23..25], &[0xff, 0xe7]);
        // jnz user: next ip 7 + 3 = 10 = push USER_DS
        assert_eq!(ENTRY[10], 0x6a);
        assert_eq!(&ENTRY[15..19], &(USER_RFLAGS as u32).to_le_bytes());
    }

    #[test]
    fn descriptors_encode_the_expected_segments() {
        let page = descriptors_page();
        let entry = |i: usize| u64::from_le_bytes(page[i * 8..i * 8 + 8].try_into().unwrap());
        assert_eq!(entry(1), 0x00af_9b00_0000_ffff);
        assert_eq!(entry(2), 0x00cf_9300_0000_ffff);
        assert_eq!(entry(3), 0x00af_fb00_0000_ffff);
        assert_eq!(entry(4), 0x00cf_f300_0000_ffff);
        assert_eq!(u64::from(USER_CS) >> 3, 3);
        assert_eq!(u64::from(USER_DS) >> 3, 4);
        assert_eq!(u64::from(TSS_SELECTOR) >> 3, 5);
        let tss = DESCRIPTORS.va + TSS_OFFSET;
        let low = entry(5);
        let base = ((low >> 16) & 0xff_ffff) | (((low >> 56) & 0xff) << 24) | (entry(6) << 32);
        assert_eq!(base, tss);
    }

    #[test]
    fn idt_gates_point_at_their_handlers() {
        let page = idt_page();
        let code = kernel_code_page();
        for v in 0..IDT_VECTORS as usize {
            let lo = u64::from_le_bytes(page[v * 16..v * 16 + 8].try_into().unwrap());
            let hi = u64::from_le_bytes(page[v * 16 + 8..v * 16 + 16].try_into().unwrap());
            let target = (lo & 0xffff) | (((lo >> 48) & 0xffff) << 16) | (hi << 32);
            let off = (target - KERNEL_CODE.va) as usize;
            assert_eq!(
                code[off..off + HANDLER_SIZE as usize],
                exception_handler(v as u8)
            );
        }
    }

    #[test]
    fn exec_snippet_carries_its_token() {
        let s = exec_snippet(0x1122_3344_5566_7788);
        assert_eq!(&s[2..10], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&s[10..14], &[0x48, 0x89, 0x43, REPORT_EXEC as u8]);
    }
}
