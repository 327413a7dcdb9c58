//! The x86-64 oracle: `qemu-system-x86_64 -cpu max` (TCG) running IA-32e page tables.
//!
//! VT-d first-level tables are the CPU's IA-32e tables (VT-d 3.x §3.6, Intel SDM vol. 3
//! §4.5), and QEMU's TCG MMU has what this machine's KVM lacks: 1 GiB pages, 5-level
//! paging (CR4.LA57) and SMEP. One [`Machine`] is one RAM file in one paging mode; each
//! [`Machine::run`] boots QEMU on it (`-M pc`, the RAM a shared `memory-backend-file`, so
//! tables a test writes into [`Machine::mem`] are the ones the CPU walks and the bits the
//! CPU sets are there after the run). A multiboot image (the program's code page) enters
//! long mode, then performs each [`Probe`] in turn: it loads CR0, CR4 and CR3 from the
//! probe, reads, writes or calls the address at CPL 0 or (through `iretq`) CPL 3, and
//! records the value, or the exception with its error code and CR2; then it reads back an
//! address the test names and the paging entries of the walk. It ends by writing an exit
//! code to `isa-debug-exit`.
//!
//! The program runs from the top-level slot 511 of every table ([`HARNESS_BASE`], the
//! same linear address with 4- and 5-level paging): entry 511 of each table a probe uses
//! must be [`Machine::harness_entry`]. Slot 511 also maps all RAM at [`PHYS_MAP`], supervisor
//! only, which is how the program reads entries and check addresses by physical address.

use crate::child::{find_on_path, wait_bounded, Ended};
use crate::error::{io, mem_err, OracleError};
use crate::x86asm::{Asm, AsmError, Cond, Reg, Seg};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

/// Where things sit in physical memory.
pub mod layout {
    /// RAM given to QEMU: 2 GiB, so that the GiB at 1 GiB can back 1 GiB pages.
    pub const RAM_SIZE: u64 = 2 << 30;
    /// The program's code page: the multiboot image, loaded here.
    pub const CODE: u64 = 0x20_0000;
    /// Where QEMU's multiboot loader puts its information structure (after the image).
    pub const MULTIBOOT_INFO: u64 = CODE + 0x1000;
    /// The user-mode access stub.
    pub const USER_CODE: u64 = CODE + 0x2000;
    /// GDT (offset 0), TSS ([`TSS_OFFSET`]) and the GDTR/IDTR images.
    pub const DESCRIPTORS: u64 = CODE + 0x3000;
    /// The IDT.
    pub const IDT: u64 = CODE + 0x4000;
    /// The ring-0 stack.
    pub const KERNEL_STACK: u64 = CODE + 0x5000;
    /// The ring-3 stack.
    pub const USER_STACK: u64 = CODE + 0x6000;
    /// The harness's own page tables (eight frames from here).
    pub const HARNESS_TABLES: u64 = 0x21_0000;
    /// The run's header: what the program found about the CPU.
    pub const HEADER: u64 = 0x30_0000;
    /// The probe list, [`RECORD`] bytes a probe.
    pub const PROBES: u64 = 0x40_0000;
    /// The results, [`RECORD`] bytes a probe.
    pub const RESULTS: u64 = 0xa0_0000;
    /// The size of a probe and of a result record.
    pub const RECORD: u64 = 128;
    /// The most probes a run takes.
    pub const MAX_PROBES: usize = ((RESULTS - PROBES) / RECORD) as usize;
    /// Frames for the tests' page tables.
    pub const TABLES: (u64, u64) = (0x100_0000, 0x400_0000);
    /// Memory the tests' pages may map and probes may reach: up to 64 MiB below the top
    /// of RAM, where the firmware (SeaBIOS, the multiboot loader) keeps its tables (it
    /// wrote into the top 17 MiB when measured).
    pub const DATA: (u64, u64) = (0x400_0000, RAM_SIZE - (64 << 20));
    /// Offset of the TSS in [`DESCRIPTORS`].
    pub const TSS_OFFSET: u64 = 0x800;
}

use layout::*;

/// Linear base of the harness: top-level index 511 with 4- and 5-level paging.
pub const HARNESS_BASE: u64 = 0xffff_ff80_0000_0000;
/// Linear address of physical address 0 in the harness's map of RAM.
pub const PHYS_MAP: u64 = HARNESS_BASE + (1 << 30);
/// The top-level index that holds the harness.
pub const HARNESS_INDEX: u64 = 511;

const fn linear(pa: u64) -> u64 {
    HARNESS_BASE + (pa - CODE)
}

const KERNEL_CS: u16 = 0x08;
const KERNEL_DS: u16 = 0x10;
const USER_CS: u16 = 0x18 | 3;
const USER_DS: u16 = 0x20 | 3;
const TSS_SELECTOR: u16 = 0x28;
/// The vector the access stub raises when its access completed (a DPL-3 gate).
const DONE_VECTOR: u8 = 0x30;
const DEBUG_EXIT_PORT: u8 = 0xf4;
/// Written to isa-debug-exit at the end: QEMU exits with `(value << 1) | 1`.
const EXIT_VALUE: u8 = 0x10;
const EXIT_STATUS: i32 = ((EXIT_VALUE as i32) << 1) | 1;
/// Written to the header's first word when every probe ran.
const FINISHED: u64 = 0x7673_7661_2d78_3836;
/// A non-canonical value left in RAX, so that code reached by mistake faults at once.
const POISON: u64 = 0x8000_0000_dead_0000;

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
/// CR0.WP: supervisor writes honour R/W (VT-d: the PASID entry's WPE).
pub const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
/// CR4.LA57: 5-level paging.
pub const CR4_LA57: u64 = 1 << 12;
/// CR4.SMEP: supervisor fetches from user pages fault.
pub const CR4_SMEP: u64 = 1 << 20;
const EFER: u32 = 0xc000_0080;
const EFER_LME: u32 = 1 << 8;
const EFER_NXE: u32 = 1 << 11;

/// Paging-entry bits the harness tables use.
const P: u64 = 1;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const PS: u64 = 1 << 7;
const XD: u64 = 1 << 63;

/// 4- or 5-level paging: fixed for a machine (CR4.LA57 cannot change in long mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PagingMode {
    /// 4-level paging.
    Level4,
    /// 5-level paging (CR4.LA57).
    Level5,
}

/// The access a probe makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// An 8-byte load.
    Read,
    /// An 8-byte store of the value.
    Write(u64),
    /// A call of the address, where code must return with RAX set (see [`exec_snippet`]).
    Execute,
}

/// One access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Probe {
    /// CR3: the top-level table (entry [`HARNESS_INDEX`] must be [`Machine::harness_entry`]).
    pub cr3: u64,
    /// CR0.WP.
    pub wp: bool,
    /// CR4.SMEP.
    pub smep: bool,
    /// At CPL 3 (else CPL 0).
    pub user: bool,
    /// The linear address: outside slot [`HARNESS_INDEX`]; 8-byte aligned for data.
    pub va: u64,
    /// What to do there.
    pub access: Access,
    /// A physical address read back after the access (into [`Report::check`]) and then
    /// overwritten with `restore`; 0 for none.
    pub check_pa: u64,
    /// The value written at `check_pa` after the read-back.
    pub restore: u64,
    /// Physical addresses of paging entries read after the access (into
    /// [`Report::entries`]); 0 for none.
    pub entries: [u64; 5],
}

/// What a probe did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The access completed: RAX after it (the value read, the snippet's token, or
    /// meaningless for a write).
    Done(u64),
    /// An exception.
    Exception {
        /// The vector (14 for #PF).
        vector: u8,
        /// The error code (0 for vectors without one).
        error_code: u64,
        /// CR2 when the handler ran.
        cr2: u64,
    },
}

/// One probe's results.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Report {
    /// The access's outcome.
    pub outcome: Outcome,
    /// The value at the probe's `check_pa` after the access (0 without one).
    pub check: u64,
    /// The entries at the probe's `entries` addresses after the access (0 where none).
    pub entries: [u64; 5],
}

/// Page-fault error code bits (Intel SDM vol. 3 §4.7).
pub mod pf {
    /// A protection violation (clear: a not-present entry).
    pub const PRESENT: u64 = 1 << 0;
    /// A write.
    pub const WRITE: u64 = 1 << 1;
    /// A user-mode access.
    pub const USER: u64 = 1 << 2;
    /// A reserved bit set in a paging entry.
    pub const RESERVED: u64 = 1 << 3;
    /// An instruction fetch.
    pub const FETCH: u64 = 1 << 4;
}

/// What the CPU reports about paging (CPUID).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Features {
    /// CPUID.(EAX=7,ECX=0):EBX.
    pub leaf7_ebx: u64,
    /// CPUID.(EAX=7,ECX=0):ECX.
    pub leaf7_ecx: u64,
    /// CPUID.80000001h:EDX.
    pub ext_edx: u64,
    /// CPUID.80000008h:EAX.
    pub ext_addr: u64,
}

impl Features {
    /// 5-level paging (CPUID.7.0:ECX\[16\]).
    pub const fn la57(&self) -> bool {
        self.leaf7_ecx & (1 << 16) != 0
    }

    /// SMEP (CPUID.7.0:EBX\[7\]).
    pub const fn smep(&self) -> bool {
        self.leaf7_ebx & (1 << 7) != 0
    }

    /// 1 GiB pages (CPUID.80000001h:EDX\[26\]).
    pub const fn gbpages(&self) -> bool {
        self.ext_edx & (1 << 26) != 0
    }

    /// Execute-disable (CPUID.80000001h:EDX\[20\]).
    pub const fn nx(&self) -> bool {
        self.ext_edx & (1 << 20) != 0
    }

    /// MAXPHYADDR (CPUID.80000008h:EAX\[7:0\]).
    pub const fn max_phys_bits(&self) -> u8 {
        (self.ext_addr & 0xff) as u8
    }
}

/// What a run reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Results {
    /// The CPU's paging features.
    pub features: Features,
    /// One report a probe, in order.
    pub reports: Vec<Report>,
}

/// The longest a run may take.
const TIMEOUT: Duration = Duration::from_secs(120);

/// Code an [`Access::Execute`] probe expects at its target: `mov rax, token; ret`
/// (11 bytes, padded with `int3` to 16).
pub fn exec_snippet(token: u64) -> [u8; 16] {
    let mut code = [0xcc; 16];
    code[..2].copy_from_slice(&[0x48, 0xb8]);
    code[2..10].copy_from_slice(&token.to_le_bytes());
    code[10] = 0xc3;
    code
}

/// The RAM file, in one paging mode, and the QEMU binary that runs it.
#[derive(Debug)]
pub struct Machine {
    qemu: PathBuf,
    dir: PathBuf,
    ram_path: PathBuf,
    mem: GuestMemoryMmap,
    mode: PagingMode,
}

/// The harness's tables (frames from [`layout::HARNESS_TABLES`]).
const BOOT_ROOT: u64 = HARNESS_TABLES;
const BOOT_PML4: u64 = HARNESS_TABLES + 0x1000;
const BOOT_PDPT: u64 = HARNESS_TABLES + 0x2000;
const BOOT_PD: u64 = HARNESS_TABLES + 0x3000;
const H_PML4: u64 = HARNESS_TABLES + 0x4000;
const H_PDPT: u64 = HARNESS_TABLES + 0x5000;
const H_PD: u64 = HARNESS_TABLES + 0x6000;
const H_PT: u64 = HARNESS_TABLES + 0x7000;
/// Level-2 tables of the RAM map, one per GiB.
const PHYS_PD: u64 = HARNESS_TABLES + 0x8000;

/// Offsets in the [`layout::DESCRIPTORS`] page.
const GDTR32: u64 = 0xf00;
const GDTR64: u64 = 0xf10;
const IDTR: u64 = 0xf20;
const GDT_ENTRIES: u64 = 7;

/// Probe record: op, va, value, cr3, cr0, cr4, user, check_pa, restore, entries[5].
const P_OP: i32 = 0;
const P_VA: i32 = 8;
const P_VALUE: i32 = 16;
const P_CR3: i32 = 24;
const P_CR0: i32 = 32;
const P_CR4: i32 = 40;
const P_USER: i32 = 48;
const P_CHECK: i32 = 56;
const P_RESTORE: i32 = 64;
const P_ENTRIES: i32 = 72;
/// Result record: status (1 done, 2 exception), rax, vector, error code, cr2, check,
/// entries[5].
const R_STATUS: i32 = 0;
const R_VALUE: i32 = 8;
const R_VECTOR: i32 = 16;
const R_ERROR: i32 = 24;
const R_CR2: i32 = 32;
const R_CHECK: i32 = 40;
const R_ENTRIES: i32 = 48;

const OP_READ: u64 = 0;
const OP_WRITE: u64 = 1;
const OP_EXECUTE: u64 = 2;

/// The supervisor copy of the access stub, in the code page.
const KERNEL_STUB: u64 = 0xc00;
/// The multiboot image's entry point, in the code page.
const ENTRY32: u64 = 0x40;

impl Machine {
    /// A machine in `mode` with zeroed RAM in a file in `dir`, if `qemu-system-x86_64` is
    /// on PATH.
    pub fn new(dir: &Path, mode: PagingMode) -> Result<Self, OracleError> {
        let qemu =
            find_on_path("qemu-system-x86_64").ok_or(OracleError::NoQemu("qemu-system-x86_64"))?;
        let ram_path = dir.join(match mode {
            PagingMode::Level4 => "ram4.bin",
            PagingMode::Level5 => "ram5.bin",
        });
        let _ = std::fs::remove_file(&ram_path);
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&ram_path)
            .map_err(io("creating the RAM file"))?;
        file.set_len(RAM_SIZE).map_err(io("sizing the RAM file"))?;
        let mem = GuestMemoryMmap::from_ranges_with_files(&[(
            GuestAddress(0),
            RAM_SIZE as usize,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(mem_err)?;
        Ok(Machine {
            qemu,
            dir: dir.to_path_buf(),
            ram_path,
            mem,
            mode,
        })
    }

    /// The RAM, where tests build tables and data (physical address = address in it).
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The paging mode.
    pub fn mode(&self) -> PagingMode {
        self.mode
    }

    /// The entry [`HARNESS_INDEX`] of every top-level table a probe uses must hold.
    pub fn harness_entry(&self) -> u64 {
        match self.mode {
            PagingMode::Level4 => H_PDPT | P | RW | US,
            PagingMode::Level5 => H_PML4 | P | RW | US,
        }
    }

    /// CR4 as the program runs probes (SMEP clear).
    fn cr4(&self) -> u64 {
        match self.mode {
            PagingMode::Level4 => CR4_PAE,
            PagingMode::Level5 => CR4_PAE | CR4_LA57,
        }
    }

    fn write_u64(&self, pa: u64, value: u64) -> Result<(), OracleError> {
        self.mem.write_obj(value, GuestAddress(pa)).map_err(mem_err)
    }

    fn read_u64(&self, pa: u64) -> Result<u64, OracleError> {
        self.mem.read_obj(GuestAddress(pa)).map_err(mem_err)
    }

    fn write(&self, pa: u64, bytes: &[u8]) -> Result<(), OracleError> {
        self.mem
            .write_slice(bytes, GuestAddress(pa))
            .map_err(mem_err)
    }

    /// The harness's tables, descriptors and stubs, written afresh for every run (the last
    /// run left accessed bits in its tables and the busy bit in its TSS descriptor).
    fn install_harness(&self) -> Result<(), OracleError> {
        // Boot: entry 0 maps the first GiB 1:1 with 2 MiB pages (the code starts there),
        // entry 511 is the harness.
        let low = match self.mode {
            PagingMode::Level4 => BOOT_PDPT,
            PagingMode::Level5 => {
                self.write_u64(BOOT_PML4, BOOT_PDPT | P | RW)?;
                BOOT_PML4
            }
        };
        self.write_u64(BOOT_ROOT, low | P | RW)?;
        self.write_u64(BOOT_ROOT + 8 * HARNESS_INDEX, self.harness_entry())?;
        self.write_u64(BOOT_PDPT, BOOT_PD | P | RW)?;
        for i in 0..512 {
            self.write_u64(BOOT_PD + 8 * i, (i << 21) | P | RW | PS)?;
        }
        // The harness: user-accessible upper entries, so that the leaves decide.
        self.write_u64(H_PML4 + 8 * HARNESS_INDEX, H_PDPT | P | RW | US)?;
        self.write_u64(H_PDPT, H_PD | P | RW | US)?;
        self.write_u64(H_PD, H_PT | P | RW | US)?;
        let pages = [
            (CODE, P),
            (USER_CODE, P | US),
            (DESCRIPTORS, P | RW | XD),
            (IDT, P | XD),
            (KERNEL_STACK, P | RW | XD),
            (USER_STACK, P | RW | US | XD),
        ];
        for (pa, flags) in pages {
            self.write_u64(H_PT + 8 * ((pa - CODE) >> 12), pa | flags)?;
        }
        // RAM at PHYS_MAP: supervisor read/write, 2 MiB pages.
        for gib in 0..RAM_SIZE >> 30 {
            let pd = PHYS_PD + 0x1000 * gib;
            self.write_u64(H_PDPT + 8 * (1 + gib), pd | P | RW)?;
            for i in 0..512 {
                self.write_u64(pd + 8 * i, (gib << 30) | (i << 21) | P | RW | PS | XD)?;
            }
        }
        // GDT, TSS, and the table registers' images.
        let tss = linear(DESCRIPTORS) + TSS_OFFSET;
        let gdt = [
            0,
            segment(true, 0),
            segment(false, 0),
            segment(true, 3),
            segment(false, 3),
            0x67 | ((tss & 0xff_ffff) << 16) | (0x89 << 40) | (((tss >> 24) & 0xff) << 56),
            tss >> 32,
        ];
        for (i, d) in gdt.iter().enumerate() {
            self.write_u64(DESCRIPTORS + 8 * i as u64, *d)?;
        }
        self.write_u64(DESCRIPTORS + TSS_OFFSET + 4, linear(KERNEL_STACK) + 0x1000)?;
        // The I/O map base past the TSS's limit: no I/O bitmap.
        self.write(DESCRIPTORS + TSS_OFFSET + 102, &104u16.to_le_bytes())?;
        let limit = (GDT_ENTRIES * 8 - 1) as u16;
        self.write(DESCRIPTORS + GDTR32, &limit.to_le_bytes())?;
        self.write(
            DESCRIPTORS + GDTR32 + 2,
            &(DESCRIPTORS as u32).to_le_bytes(),
        )?;
        self.write(DESCRIPTORS + GDTR64, &limit.to_le_bytes())?;
        self.write(DESCRIPTORS + GDTR64 + 2, &linear(DESCRIPTORS).to_le_bytes())?;
        self.write(DESCRIPTORS + IDTR, &(256u16 * 16 - 1).to_le_bytes())?;
        self.write(DESCRIPTORS + IDTR + 2, &linear(IDT).to_le_bytes())?;
        self.write(USER_CODE, &access_stub()?)?;
        Ok(())
    }

    /// The program's record of probe `i`, or why it cannot run.
    fn record(&self, i: usize, p: &Probe) -> Result<Vec<u8>, OracleError> {
        let bad = |why| OracleError::BadProbe { index: i, why };
        let top = match self.mode {
            PagingMode::Level4 => (p.va >> 39) & 511,
            PagingMode::Level5 => (p.va >> 48) & 511,
        };
        if top == HARNESS_INDEX {
            return Err(bad("the address is in the harness's slot"));
        }
        if p.cr3 & 0xfff != 0 || p.cr3 >= RAM_SIZE {
            return Err(bad("CR3 is not a 4 KiB-aligned address in RAM"));
        }
        let in_ram = |pa: u64| pa == 0 || (pa % 8 == 0 && pa < RAM_SIZE);
        if !in_ram(p.check_pa) || !p.entries.iter().all(|&e| in_ram(e)) {
            return Err(bad("a read-back address is not an aligned address in RAM"));
        }
        let (op, value) = match p.access {
            Access::Read => (OP_READ, 0),
            Access::Write(v) => (OP_WRITE, v),
            Access::Execute => (OP_EXECUTE, 0),
        };
        let cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG | if p.wp { CR0_WP } else { 0 };
        let cr4 = self.cr4() | if p.smep { CR4_SMEP } else { 0 };
        let mut rec = vec![
            op,
            p.va,
            value,
            p.cr3,
            cr0,
            cr4,
            u64::from(p.user),
            p.check_pa,
            p.restore,
        ];
        rec.extend_from_slice(&p.entries);
        Ok(rec.iter().flat_map(|w| w.to_le_bytes()).collect())
    }

    /// Runs `probes` in order and returns what each did. The RAM keeps what the run left
    /// (accessed/dirty bits, stores). A probe the program cannot run is an error before
    /// anything is written.
    pub fn run(&self, probes: &[Probe]) -> Result<Results, OracleError> {
        if probes.len() > MAX_PROBES {
            return Err(OracleError::TooManyProbes {
                count: probes.len(),
                max: MAX_PROBES,
            });
        }
        let records = probes
            .iter()
            .enumerate()
            .map(|(i, p)| self.record(i, p))
            .collect::<Result<Vec<_>, _>>()?;
        self.install_harness()?;
        let (code, handlers) = program(probes.len() as u64, self.cr4())?;
        // The IDT: an interrupt gate a vector, DPL 3 for the stub's "done" vector.
        for (vector, offset) in handlers {
            let handler = linear(CODE) + offset;
            let dpl = if vector == DONE_VECTOR { 3 } else { 0 };
            let low = (handler & 0xffff)
                | (u64::from(KERNEL_CS) << 16)
                | ((0x8e | (dpl << 5)) << 40)
                | (((handler >> 16) & 0xffff) << 48);
            let at = IDT + 16 * u64::from(vector);
            self.write_u64(at, low)?;
            self.write_u64(at + 8, handler >> 32)?;
        }
        for (i, rec) in records.iter().enumerate() {
            self.write(PROBES + RECORD * i as u64, rec)?;
        }
        self.write(HEADER, &[0; 64])?;
        self.write(RESULTS, &vec![0; (RECORD as usize) * probes.len().max(1)])?;
        let image = self.dir.join("multiboot.bin");
        std::fs::write(&image, &code).map_err(io("writing the multiboot image"))?;

        let mut cmd = Command::new(&self.qemu);
        // VSVA_QEMU_ORACLE_TRACE=1 keeps QEMU's exception log next to the RAM file.
        if std::env::var_os("VSVA_QEMU_ORACLE_TRACE").is_some() {
            cmd.args(["-d", "int,guest_errors,unimp", "-D"])
                .arg(self.dir.join("qemu-x86.log"));
        }
        let child = cmd
            .args([
                "-M",
                "pc,memory-backend=ram",
                "-cpu",
                "max",
                "-accel",
                "tcg",
            ])
            .args(["-smp", "1", "-m", &format!("{}M", RAM_SIZE >> 20)])
            .arg("-object")
            .arg(format!(
                "memory-backend-file,id=ram,size={RAM_SIZE},mem-path={},share=on",
                self.ram_path.display()
            ))
            .args(["-nodefaults", "-display", "none", "-monitor", "none"])
            .args(["-serial", "none", "-no-reboot", "-device"])
            .arg(format!(
                "isa-debug-exit,iobase={DEBUG_EXIT_PORT:#x},iosize=1"
            ))
            .arg("-kernel")
            .arg(&image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io("starting qemu-system-x86_64"))?;
        let (status, stderr) = match wait_bounded(child, TIMEOUT).map_err(io("waiting for qemu"))? {
            Ended::Exited { status, stderr } => (status, stderr),
            Ended::TimedOut => return Err(OracleError::Timeout(TIMEOUT)),
        };
        if status.code() != Some(EXIT_STATUS) {
            return Err(OracleError::QemuFailed {
                status: format!("{status} (the program exits with {EXIT_STATUS})"),
                stderr,
            });
        }
        if self.read_u64(HEADER)? != FINISHED {
            return Err(OracleError::Unfinished);
        }
        let features = Features {
            leaf7_ebx: self.read_u64(HEADER + 8)?,
            leaf7_ecx: self.read_u64(HEADER + 16)?,
            ext_edx: self.read_u64(HEADER + 24)?,
            ext_addr: self.read_u64(HEADER + 32)?,
        };
        let reports = (0..probes.len())
            .map(|i| {
                let at = RESULTS + RECORD * i as u64;
                let word = |off: i32| self.read_u64(at + off as u64);
                let outcome = match word(R_STATUS)? {
                    1 => Outcome::Done(word(R_VALUE)?),
                    _ => Outcome::Exception {
                        vector: word(R_VECTOR)? as u8,
                        error_code: word(R_ERROR)?,
                        cr2: word(R_CR2)?,
                    },
                };
                let mut entries = [0; 5];
                for (k, e) in entries.iter_mut().enumerate() {
                    *e = word(R_ENTRIES + 8 * k as i32)?;
                }
                Ok(Report {
                    outcome,
                    check: word(R_CHECK)?,
                    entries,
                })
            })
            .collect::<Result<_, OracleError>>()?;
        Ok(Results { features, reports })
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.ram_path);
    }
}

/// A flat 64-bit code or data segment descriptor, accessed bit preset.
const fn segment(code: bool, dpl: u64) -> u64 {
    let access = 0x80 | (dpl << 5) | 0x10 | if code { 0x0b } else { 0x03 };
    let flags = if code { 0xa } else { 0xc }; // G + L for code, G + D/B for data
    0xffff | (access << 40) | (0xf << 48) | (flags << 52)
}

/// The access stub, run at the probe's CPL with RDI = address, RSI = operation, R8 = the
/// value to write: it reads into RAX, writes, or calls the address, then raises the
/// "done" vector. Position-independent: the same bytes serve both privilege levels.
fn access_stub() -> Result<Vec<u8>, AsmError> {
    let mut a = Asm::new();
    let (write, exec) = (a.label(), a.label());
    a.cmp_imm(Reg::Rsi, OP_WRITE as i32);
    a.jcc(Cond::Equal, write);
    a.cmp_imm(Reg::Rsi, OP_EXECUTE as i32);
    a.jcc(Cond::Equal, exec);
    a.load(Reg::Rax, Reg::Rdi, 0);
    a.int(DONE_VECTOR);
    a.bind(write);
    a.store(Reg::Rdi, 0, Reg::R8);
    a.int(DONE_VECTOR);
    a.bind(exec);
    a.call_reg(Reg::Rdi);
    a.int(DONE_VECTOR);
    a.finish()
}

/// The offset in the code page of each IDT vector's handler.
type Handlers = Vec<(u8, u64)>;

/// Whether exception `vector` pushes an error code (Intel SDM vol. 3 §6.15).
const fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// The code page for `count` probes with CR4 `cr4` while starting: the multiboot header,
/// the 32-bit start-up, the probe loop, the handlers and the kernel stub. Returns the
/// page and the offset of each IDT vector's handler.
fn program(count: u64, cr4: u64) -> Result<(Vec<u8>, Handlers), AsmError> {
    use Reg::*;
    let mut a = Asm::new();
    // Multiboot header (Multiboot 0.6.96 §3.1): the a.out kludge loads this page at CODE.
    let flags: u32 = 1 << 16;
    let magic: u32 = 0x1bad_b002;
    for w in [
        magic,
        flags,
        0u32.wrapping_sub(magic.wrapping_add(flags)),
        CODE as u32,
        CODE as u32,
        0,
        0,
        (CODE + ENTRY32) as u32,
    ] {
        a.bytes(&w.to_le_bytes());
    }
    // 32-bit protected mode, paging off: the GDT, PAE (and LA57), the boot tables,
    // EFER.LME/NXE, paging, then a far jump into the 64-bit code segment.
    a.pad_to(ENTRY32 as usize, 0xcc);
    a.mov_imm32(Rax, (DESCRIPTORS + GDTR32) as u32);
    a.lgdt(Rax);
    a.mov_imm32(Rax, cr4 as u32);
    a.mov_to_cr(4, Rax);
    a.mov_imm32(Rax, BOOT_ROOT as u32);
    a.mov_to_cr(3, Rax);
    a.mov_imm32(Rcx, EFER);
    a.mov_imm32(Rax, EFER_LME | EFER_NXE);
    a.mov_imm32(Rdx, 0);
    a.wrmsr();
    a.mov_imm32(Rax, (CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG) as u32);
    a.mov_to_cr(0, Rax);
    let entry64 = (a.offset() + 7) as u64;
    a.ljmp32(KERNEL_CS, (CODE + entry64) as u32);
    // 64-bit mode on the identity map: on to the harness's address.
    let high = a.label();
    let high_at = a.offset() + 16;
    a.mov_imm64(Rax, linear(CODE) + high_at as u64);
    a.jmp_reg(Rax);
    a.pad_to(high_at, 0xcc);
    a.bind(high);
    a.mov_imm64(Rax, linear(DESCRIPTORS) + GDTR64);
    a.lgdt(Rax);
    a.mov_imm64(Rax, linear(DESCRIPTORS) + IDTR);
    a.lidt(Rax);
    a.mov_imm32(Rax, u32::from(KERNEL_DS));
    a.mov_to_seg(Seg::Ds, Rax);
    a.mov_to_seg(Seg::Es, Rax);
    a.mov_to_seg(Seg::Ss, Rax);
    a.mov_imm32(Rax, u32::from(TSS_SELECTOR));
    a.ltr(Rax);
    a.mov_imm64(Rsp, linear(KERNEL_STACK) + 0x1000);
    a.mov_imm64(R15, PHYS_MAP);
    // The CPU's paging features, into the header.
    a.mov_imm64(Rdi, PHYS_MAP + HEADER);
    a.mov_imm32(Rax, 7);
    a.mov_imm32(Rcx, 0);
    a.cpuid();
    a.store(Rdi, 8, Rbx);
    a.store(Rdi, 16, Rcx);
    a.mov_imm32(Rax, 0x8000_0001);
    a.mov_imm32(Rcx, 0);
    a.cpuid();
    a.store(Rdi, 24, Rdx);
    a.mov_imm32(Rax, 0x8000_0008);
    a.mov_imm32(Rcx, 0);
    a.cpuid();
    a.store(Rdi, 32, Rax);
    // R12 the probe, R13 its result record, R14 probes left, R15 the RAM map.
    a.mov_imm64(R12, PHYS_MAP + PROBES);
    a.mov_imm64(R13, PHYS_MAP + RESULTS);
    a.mov_imm64(R14, count);
    let (next, done, after, user) = (a.label(), a.label(), a.label(), a.label());
    a.bind(next);
    a.test(R14, R14);
    a.jcc(Cond::Equal, done);
    a.mov_imm64(Rsp, linear(KERNEL_STACK) + 0x1000);
    // CR0 (WP), CR4 (SMEP), then CR3: with CR4.PGE clear, the CR3 load flushes every
    // translation and paging-structure cache, so each probe walks the tables afresh.
    a.load(Rax, R12, P_CR0);
    a.mov_to_cr(0, Rax);
    a.load(Rax, R12, P_CR4);
    a.mov_to_cr(4, Rax);
    a.load(Rax, R12, P_CR3);
    a.mov_to_cr(3, Rax);
    a.load(Rdi, R12, P_VA);
    a.load(Rsi, R12, P_OP);
    a.load(R8, R12, P_VALUE);
    a.mov_imm64(Rax, POISON);
    a.load(Rcx, R12, P_USER);
    a.test(Rcx, Rcx);
    a.jcc(Cond::NotEqual, user);
    a.mov_imm64(Rcx, linear(CODE) + KERNEL_STUB);
    a.jmp_reg(Rcx);
    // CPL 3: an iretq frame (SS, RSP, RFLAGS with IF clear, CS, RIP).
    a.bind(user);
    for v in [
        u64::from(USER_DS),
        linear(USER_STACK) + 0x1000,
        0x2,
        u64::from(USER_CS),
        linear(USER_CODE),
    ] {
        a.mov_imm64(Rcx, v);
        a.push(Rcx);
    }
    a.mov_imm64(Rax, POISON);
    a.iretq();
    // After the access or the exception: the read-back, then the entries.
    a.bind(after);
    a.mov_imm64(Rsp, linear(KERNEL_STACK) + 0x1000);
    let no_check = a.label();
    a.load(Rcx, R12, P_CHECK);
    a.test(Rcx, Rcx);
    a.jcc(Cond::Equal, no_check);
    a.add(Rcx, R15);
    a.load(Rax, Rcx, 0);
    a.store(R13, R_CHECK, Rax);
    a.load(Rdx, R12, P_RESTORE);
    a.store(Rcx, 0, Rdx);
    a.bind(no_check);
    for k in 0..5 {
        let skip = a.label();
        a.load(Rcx, R12, P_ENTRIES + 8 * k);
        a.test(Rcx, Rcx);
        a.jcc(Cond::Equal, skip);
        a.add(Rcx, R15);
        a.load(Rax, Rcx, 0);
        a.store(R13, R_ENTRIES + 8 * k, Rax);
        a.bind(skip);
    }
    a.add_imm(R12, RECORD as i32);
    a.add_imm(R13, RECORD as i32);
    a.sub_imm(R14, 1);
    a.jmp(next);
    a.bind(done);
    a.mov_imm64(Rdi, PHYS_MAP + HEADER);
    a.mov_imm64(Rax, FINISHED);
    a.store(Rdi, 0, Rax);
    a.mov_imm32(Rax, u32::from(EXIT_VALUE));
    a.out_al(DEBUG_EXIT_PORT);
    let stop = a.label();
    a.bind(stop);
    a.hlt();
    a.jmp(stop);
    // The "done" vector: RAX is the access's value.
    let mut handlers = Vec::new();
    handlers.push((DONE_VECTOR, a.offset() as u64));
    a.store(R13, R_VALUE, Rax);
    a.mov_imm32(Rax, 1);
    a.store(R13, R_STATUS, Rax);
    a.jmp(after);
    // Exceptions 0..32: push a zero error code where the CPU pushes none, then the vector.
    let common = a.label();
    for vector in 0..32u8 {
        handlers.push((vector, a.offset() as u64));
        if !has_error_code(vector) {
            a.push_imm8(0);
        }
        a.push_imm8(vector as i8);
        a.jmp(common);
    }
    a.bind(common);
    a.pop(Rcx);
    a.pop(Rdx);
    a.store(R13, R_VECTOR, Rcx);
    a.store(R13, R_ERROR, Rdx);
    a.mov_from_cr(Rax, 2);
    a.store(R13, R_CR2, Rax);
    a.mov_imm32(Rax, 2);
    a.store(R13, R_STATUS, Rax);
    a.jmp(after);
    a.pad_to(KERNEL_STUB as usize, 0xcc);
    a.bytes(&access_stub()?);
    a.pad_to(0x1000, 0xcc);
    Ok((a.finish()?, handlers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_fits_its_page_and_starts_with_a_valid_multiboot_header() {
        let (code, handlers) = program(3, CR4_PAE).unwrap();
        assert_eq!(code.len(), 0x1000);
        let word = |i: usize| u32::from_le_bytes(code[4 * i..4 * i + 4].try_into().unwrap());
        assert_eq!(word(0), 0x1bad_b002);
        assert_eq!(word(0).wrapping_add(word(1)).wrapping_add(word(2)), 0);
        assert_eq!(word(7) as u64, CODE + ENTRY32);
        assert_eq!(
            &code[KERNEL_STUB as usize..][..access_stub().unwrap().len()],
            &access_stub().unwrap()[..]
        );
        // A handler for each exception and for the "done" vector, none past the stub.
        assert_eq!(handlers.len(), 33);
        assert!(handlers.iter().all(|&(_, off)| off < KERNEL_STUB));
    }

    #[test]
    fn the_harness_is_in_slot_511_in_both_modes() {
        assert_eq!((HARNESS_BASE >> 39) & 511, HARNESS_INDEX);
        assert_eq!((HARNESS_BASE >> 48) & 511, HARNESS_INDEX);
        assert_eq!((PHYS_MAP + RAM_SIZE - 1) >> 39, HARNESS_BASE >> 39);
        assert!(segment(true, 3) == 0x00af_fb00_0000_ffff);
        assert!(segment(false, 0) == 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn the_exec_snippet_returns_its_token() {
        let s = exec_snippet(0x1122_3344_5566_7788);
        assert_eq!(&s[..2], &[0x48, 0xb8]);
        assert_eq!(&s[2..10], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(s[10], 0xc3);
    }
}
