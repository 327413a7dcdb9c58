//! The QEMU run: the RAM image, the EL1 program and the results file.

use crate::a64::{
    Asm, AsmError, Cond, Label, SysReg, X0, X1, X10, X11, X12, X19, X2, X20, X21, X22, X23, X24,
    X3, X30, X4, X9,
};
use crate::child::{find_on_path, wait_bounded, Ended};
use crate::error::{io, mem_err, OracleError};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Where things sit in the guest's physical address space (`-M virt` RAM starts at 1 GiB).
pub mod layout {
    /// The first byte of RAM.
    pub const RAM_BASE: u64 = 0x4000_0000;
    /// The first byte of the image: above the device tree QEMU puts at the start of RAM.
    pub const IMAGE_BASE: u64 = RAM_BASE + (2 << 20);
    /// RAM given to QEMU.
    pub const RAM_SIZE: u64 = 128 << 20;
    /// The image loaded at [`IMAGE_BASE`].
    pub const IMAGE_SIZE: u64 = 64 << 20;
    /// The exception vectors (VBAR_EL1 needs 2 KiB alignment).
    pub const VECTORS: u64 = IMAGE_BASE;
    /// The program's entry point.
    pub const ENTRY: u64 = IMAGE_BASE + 0x800;
    /// Semihosting parameter blocks and the results file name.
    pub const BLOCKS: u64 = IMAGE_BASE + 0x1_0000;
    /// The probe list: 32 bytes a probe.
    pub const PROBES: u64 = IMAGE_BASE + 0x2_0000;
    /// The most probes a run takes.
    pub const MAX_PROBES: usize = ((RESULTS - PROBES) / 32) as usize;
    /// The results: a 64-byte header, then 32 bytes a probe.
    pub const RESULTS: u64 = IMAGE_BASE + 0x10_0000;
    /// The tables TTBR1 uses (and TTBR0 while the program starts and ends): they map the
    /// first GiB of RAM at `HIGH + pa` and at `pa`, EL1 read/write except the program's
    /// pages, which are read-only (so they stay executable with SCTLR_EL1.WXN). A level-2
    /// table of 2 MiB blocks, with a level-3 table for the image's first 2 MiB.
    pub const BOOT_L2: u64 = IMAGE_BASE + 0x1f_d000;
    /// The level-3 table of the image's first 2 MiB.
    pub const BOOT_L3: u64 = IMAGE_BASE + 0x1f_e000;
    /// The level-1 table: TTBR1_EL1.
    pub const BOOT_TABLE: u64 = IMAGE_BASE + 0x1f_f000;
    /// The program's pages: the vectors and the code (read-only).
    pub const PROGRAM_BYTES: u64 = 0x1_0000;
    /// The page of the program EL0 runs (read-only at EL0 and EL1).
    pub const EL0_STUB: u64 = VECTORS + 0xf000;
    /// The page of the program EL1 runs in the stage-2 harness (at IPA
    /// [`crate::el2::S2_STUB_IPA`]).
    pub const S2_STUB: u64 = VECTORS + 0xe000;
    /// Frames for the tests' translation tables (32 MiB: 64 KiB-granule tables are large).
    pub const TABLES: (u64, u64) = (IMAGE_BASE + 0x20_0000, IMAGE_BASE + 0x220_0000);
    /// Memory the probes may reach.
    pub const DATA: (u64, u64) = (IMAGE_BASE + 0x220_0000, IMAGE_BASE + IMAGE_SIZE);
    /// The TTBR1 alias of physical address 0: the program runs at `HIGH + pa`.
    pub const HIGH: u64 = 0xffff_ff80_0000_0000;
    /// T1SZ (and T0SZ while starting): 39-bit ranges, level-1 start tables.
    pub const BOOT_TSZ: u64 = 25;
}

use layout::*;

/// The kind of one probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProbeOp {
    /// LDR at EL1.
    Load,
    /// STR at EL1.
    Store,
    /// LDTR at EL1: a load with EL0's permissions.
    LoadUnprivileged,
    /// STTR at EL1: a store with EL0's permissions.
    StoreUnprivileged,
    /// BLR at EL1: an instruction fetch. The code found there must set X3 and return (see
    /// [`fetch_snippet`]); X3 is the outcome's value.
    Fetch,
    /// BLR at EL0 (ERET to a stub, SVC back): an unprivileged instruction fetch.
    FetchUnprivileged,
    /// Not an access, for [`Harness::Stage2`] only: load VTTBR_EL2 (the probe's `va`: the
    /// stage-2 table with the VMID in bits 63:48) and VTCR_EL2 (its `value`), then TLBI
    /// VMALLS12E1.
    Stage2Switch,
    /// Not an access, for [`Harness::Stage2`] only: load TTBR0_EL1 (the probe's `va`, an
    /// IPA) and TCR_EL1 (its `value`), and turn EL1's stage 1 on or off (SCTLR_EL1.M, with
    /// C and I; MAIR_EL1 makes every attribute Normal write-back). With stage 1 on, the
    /// probes are nested: the table must map VA 0 to IPA 0 for the program's 64 KiB
    /// (EL1-executable) so that the stub and its EL1 vectors run, and TCR_EL1 should set
    /// EPD1. A stage-1 fault is taken to EL1 and reported with ESR_EL1 and FAR_EL1.
    Stage1Switch {
        /// SCTLR_EL1.M for the probes that follow.
        enable: bool,
    },
    /// Not an access: load TTBR0_EL1, TTBR1_EL1 and TCR_EL1, set PSTATE.PAN and
    /// SCTLR_EL1.WXN, then TLBI VMALLE1.
    Switch {
        /// TTBR1_EL1 for the probes that follow, 0 for the boot table
        /// ([`layout::BOOT_TABLE`]). With [`Harness::Upper`] the program runs in the upper
        /// range (T1SZ 25, 4 KiB TG1): entry 1 of a test's level-1 table must be
        /// `BOOT_L2 | 3` (a table descriptor of the boot level-2 table), which keeps the
        /// GiB at `HIGH + RAM_BASE` mapped.
        ttbr1: u64,
        /// PSTATE.PAN for the probes that follow: EL1 loads and stores of pages EL0 may
        /// access fault.
        pan: bool,
        /// SCTLR_EL1.WXN for the probes that follow: writable pages are execute-never.
        wxn: bool,
    },
}

impl ProbeOp {
    pub(crate) const fn code(self) -> u64 {
        match self {
            ProbeOp::Load => 0,
            ProbeOp::Store => 1,
            ProbeOp::LoadUnprivileged => 2,
            ProbeOp::StoreUnprivileged => 3,
            ProbeOp::Switch { .. } => 4,
            ProbeOp::Fetch => 5,
            ProbeOp::FetchUnprivileged => 6,
            ProbeOp::Stage2Switch => 7,
            ProbeOp::Stage1Switch { .. } => 8,
        }
    }

    /// Whether it writes.
    pub const fn is_store(self) -> bool {
        matches!(self, ProbeOp::Store | ProbeOp::StoreUnprivileged)
    }
}

/// Where the program runs while it probes, which decides what a [`ProbeOp::Switch`]'s
/// tables must map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Harness {
    /// At the TTBR1 alias [`layout::HIGH`]: a switch's TTBR1 table keeps the program's GiB
    /// (its level-1 entry 1 is `BOOT_L2 | 3`) with T1SZ 25, the 4 KiB TG1 and EPD1 clear;
    /// TTBR0 and the rest of TCR_EL1 are the test's.
    Upper,
    /// At its physical address, through TTBR0: a switch's TTBR0 table (4 KiB TG0, T0SZ at
    /// most 33, EPD0 clear) maps VA [`layout::IMAGE_BASE`]'s 2 MiB through the boot
    /// level-3 table (its level-2 descriptor is `BOOT_L3 | 3`); TTBR1 and TCR_EL1's T1SZ,
    /// TG1, EPD1 and TBI1 are the test's (see [`tcr_ttbr1`]). The program switches with the
    /// MMU off.
    Identity,
    /// At EL2 with its MMU off (`-M virt,virtualization=on`): each [`ProbeOp::Load`],
    /// [`ProbeOp::Store`] or [`ProbeOp::Fetch`] runs at EL1 with stage 1 off, so its `va`
    /// is an IPA, through the stage-2 table of the last [`ProbeOp::Stage2Switch`]
    /// (HCR_EL2.VM set), which must map IPA 0 to [`layout::VECTORS`] for the program's
    /// 64 KiB (readable, executable, AF set): the EL1 stub runs at
    /// [`crate::el2::S2_STUB_IPA`]. A stage-2 fault is an [`Abort`] with ESR_EL2, FAR_EL2 and
    /// HPFAR_EL2 (see [`crate::el2`]). After a [`ProbeOp::Stage1Switch`] that enables it,
    /// EL1's stage 1 translates first (nested), and a stage-1 fault is an [`Abort`] with
    /// ESR_EL1 and FAR_EL1.
    Stage2,
}

impl Harness {
    /// The VA of physical address 0 while probing.
    const fn base(self) -> u64 {
        match self {
            Harness::Upper => HIGH,
            Harness::Identity | Harness::Stage2 => 0,
        }
    }
}

/// One step of the program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Probe {
    /// What to do.
    pub op: ProbeOp,
    /// The VA accessed (TTBR0 for a switch).
    pub va: u64,
    /// The value stored (TCR_EL1 for a switch).
    pub value: u64,
    /// For a store: a physical address read back (MMU off in effect: through the identity
    /// map) after every probe ran; 0 for none.
    pub check_pa: u64,
}

/// A synchronous exception the program caught: a Data Abort, or an Instruction Abort for a
/// fetch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Abort {
    /// ESR_EL1 (ESR_EL2 in the stage-2 harness).
    pub esr: u64,
    /// FAR_EL1 (FAR_EL2).
    pub far: u64,
    /// HPFAR_EL2 in the stage-2 harness (FIPA, IPA\[51:12\], in bits 43:4); 0 otherwise.
    pub hpfar: u64,
}

impl Abort {
    /// ESR_EL1.EC.
    pub const fn ec(&self) -> u64 {
        (self.esr >> 26) & 0x3f
    }

    /// ISS.DFSC for a data abort.
    pub const fn dfsc(&self) -> u64 {
        self.esr & 0x3f
    }

    /// ISS.WnR for a data abort.
    pub const fn wnr(&self) -> bool {
        self.esr & (1 << 6) != 0
    }

    /// ISS.S1PTW: a stage-2 fault on a stage-1 table walk.
    pub const fn s1ptw(&self) -> bool {
        self.esr & (1 << 7) != 0
    }
}

/// The code a [`ProbeOp::Fetch`] runs: `X3 = tag`, then return. 16 bytes. It starts with
/// BTI c so that a guarded page (GP, bit 50 of a stage-1 leaf, which the SMMU ignores)
/// runs it too.
pub fn fetch_snippet(tag: u32) -> Vec<u8> {
    let mut a = Asm::new();
    a.bti_c();
    a.movz(3, tag as u16, 0);
    a.movk(3, (tag >> 16) as u16, 1);
    a.ret();
    // Four fixed words: nothing can fail.
    Asm::bytes(&a.finish().unwrap_or_default())
}

/// What one probe did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The access completed: the value loaded, or for a store the value read back at its
    /// `check_pa` at the end (0 without one).
    Done(u64),
    /// It took a synchronous exception.
    Abort(Abort),
}

/// The CPU's memory-model features.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Features {
    /// ID_AA64MMFR0_EL1.
    pub mmfr0: u64,
    /// ID_AA64MMFR1_EL1.
    pub mmfr1: u64,
    /// CurrentEL where the program started (the Exception level in bits 3:2).
    pub current_el: u64,
}

impl Features {
    /// ID_AA64MMFR1_EL1.HAFDBS: 0 none, 1 the Access flag, 2 also dirty state.
    pub const fn hafdbs(&self) -> u64 {
        self.mmfr1 & 0xf
    }

    /// ID_AA64MMFR1_EL1.PAN: 0 without FEAT_PAN.
    pub const fn pan(&self) -> u64 {
        (self.mmfr1 >> 20) & 0xf
    }

    /// ID_AA64MMFR0_EL1.PARange (6: 52 bits, FEAT_LPA).
    pub const fn pa_range(&self) -> u64 {
        self.mmfr0 & 0xf
    }

    /// Whether stage 1 supports the 16 KiB granule (ID_AA64MMFR0_EL1.TGran16 nonzero).
    pub const fn gran16k(&self) -> bool {
        (self.mmfr0 >> 20) & 0xf != 0
    }

    /// Whether stage 1 supports the 64 KiB granule (ID_AA64MMFR0_EL1.TGran64 not 0xf).
    pub const fn gran64k(&self) -> bool {
        (self.mmfr0 >> 24) & 0xf != 0xf
    }
}

/// What a run reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Results {
    /// The CPU's features.
    pub features: Features,
    /// One outcome a probe, in order.
    pub outcomes: Vec<Outcome>,
    /// The table frames ([`layout::TABLES`]) as the run left them.
    pub tables: Vec<u8>,
}

/// The longest a run may take.
const TIMEOUT: Duration = Duration::from_secs(60);
/// Semihosting operations (Arm semihosting specification, version 2).
const SYS_OPEN: u64 = 0x01;
const SYS_CLOSE: u64 = 0x02;
const SYS_WRITE: u64 = 0x05;
const SYS_EXIT: u64 = 0x18;
/// ADP_Stopped_ApplicationExit.
const APPLICATION_EXIT: u64 = 0x2_0026;
/// Semihosting open mode "wb".
const MODE_WB: u64 = 5;
/// The semihosting parameter blocks in [`layout::BLOCKS`].
const OPEN_BLOCK: u64 = BLOCKS;
const WRITE_BLOCK: u64 = BLOCKS + 0x20;
const CLOSE_BLOCK: u64 = BLOCKS + 0x40;
const EXIT_OK: u64 = BLOCKS + 0x60;
const EXIT_FAIL: u64 = BLOCKS + 0x80;
const FILE_NAME: u64 = BLOCKS + 0x100;
const FILE_NAME_MAX: usize = 0xf00;
/// The results header: ID_AA64MMFR0_EL1, ID_AA64MMFR1_EL1, CurrentEL, pad, then a scratch
/// record for exceptions before the first probe.
pub(crate) const HEADER: u64 = 64;
/// MAIR_EL1: every attribute Normal, Inner/Outer Write-Back (the tests vary AttrIndx).
const MAIR: u64 = u64::MAX;
/// TCR_EL1 apart from T0SZ, IPS, HA and HD: IRGN/ORGN write-back, inner shareable, 4 KiB
/// TG0 and TG1, T1SZ = 25.
const TCR_FIXED: u64 = (1 << 8)
    | (1 << 10)
    | (3 << 12)
    | (BOOT_TSZ << 16)
    | (1 << 24)
    | (1 << 26)
    | (3 << 28)
    | (2 << 30);
/// SCTLR_EL1: the v8.0 RES1 bits, M, C and I; no alignment checks, WXN clear.
const SCTLR: u64 = 0x30d0_0800 | 1 | (1 << 2) | (1 << 12);

/// TCR_EL1.EPD0: no walks of TTBR0 (every TTBR0 address is a Translation fault).
pub const TCR_EPD0: u64 = 1 << 7;
/// TCR_EL1.TBI0: the top byte of TTBR0 addresses is ignored.
pub const TCR_TBI0: u64 = 1 << 37;
/// TCR_EL1.EPD1: no walks of TTBR1 (every TTBR1 address is a Translation fault, level 0).
pub const TCR_EPD1: u64 = 1 << 23;
/// TCR_EL1.TBI1: the top byte of TTBR1 addresses is ignored.
pub const TCR_TBI1: u64 = 1 << 38;

/// `tcr` with T1SZ = `t1sz` and TG1 the granule `tg`, given in the encoding of the SMMU's
/// CD.TG0 (0 4 KiB, 1 64 KiB, 2 16 KiB; TG1 encodes them 2, 3 and 1). For
/// [`Harness::Identity`], where TTBR1 is the test's.
pub const fn tcr_ttbr1(tcr: u64, t1sz: u8, tg: u64) -> u64 {
    let tg1 = match tg & 3 {
        1 => 3,
        2 => 1,
        _ => 2,
    };
    (tcr & !(0x3f << 16) & !(3 << 30)) | ((t1sz as u64 & 0x3f) << 16) | (tg1 << 30)
}

/// TCR_EL1 for a stage-1 table with `t0sz`, output size `ips` (the IPS encoding), and the
/// hardware Access flag (HA) and dirty state (HD) updates; the 4 KiB granule (TG0 = 0).
pub const fn tcr(t0sz: u8, ips: u64, ha: bool, hd: bool) -> u64 {
    TCR_FIXED | (t0sz as u64) | (ips << 32) | ((ha as u64) << 39) | ((hd as u64) << 40)
}

/// TCR_EL1.TG0 set to `tg0`, which has the encoding of the SMMU's CD.TG0 and STE.S2TG
/// (0 4 KiB, 1 64 KiB, 2 16 KiB); OR it into a [`tcr`] value.
pub const fn tcr_tg0(tg0: u64) -> u64 {
    (tg0 & 3) << 14
}

/// The RAM image and the QEMU binary that runs it.
#[derive(Debug)]
pub struct Machine {
    qemu: PathBuf,
    mem: GuestMemoryMmap,
    dir: PathBuf,
}

impl Machine {
    /// A machine with zeroed RAM, if `qemu-system-aarch64` is on PATH; `dir` takes the image
    /// and results files.
    pub fn new(dir: &Path) -> Result<Self, OracleError> {
        let qemu = find_on_path("qemu-system-aarch64")
            .ok_or(OracleError::NoQemu("qemu-system-aarch64"))?;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(IMAGE_BASE), IMAGE_SIZE as usize)])
            .map_err(mem_err)?;
        let m = Machine {
            qemu,
            mem,
            dir: dir.to_path_buf(),
        };
        // TTBR1 (and the identity map while starting): entry 1 of the level-1 table is the
        // GiB at RAM_BASE; leaves are EL1 read/write (read-only for the program), AF, inner
        // shareable, AttrIndx 0.
        m.write_u64(BOOT_TABLE + 8, BOOT_L2 | 3)?;
        for i in 0..512 {
            let pa = RAM_BASE + (i << 21);
            let entry = if pa == IMAGE_BASE {
                BOOT_L3 | 3
            } else {
                pa | 0x701
            };
            m.write_u64(BOOT_L2 + 8 * i, entry)?;
            let page = IMAGE_BASE + (i << 12);
            let ro = if page == EL0_STUB {
                0xc0
            } else if page < VECTORS + PROGRAM_BYTES {
                0x80
            } else {
                0
            };
            m.write_u64(BOOT_L3 + 8 * i, page | 0x703 | ro)?;
        }
        Ok(m)
    }

    /// The image's memory, where tests build tables and data.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    fn write_u64(&self, addr: u64, value: u64) -> Result<(), OracleError> {
        self.mem
            .write_obj(value, GuestAddress(addr))
            .map_err(mem_err)
    }

    /// The image as it stands.
    pub fn snapshot(&self) -> Result<Vec<u8>, OracleError> {
        let mut bytes = vec![0; IMAGE_SIZE as usize];
        self.mem
            .read_slice(&mut bytes, GuestAddress(IMAGE_BASE))
            .map_err(mem_err)?;
        Ok(bytes)
    }

    /// Runs `probes` in order on `image` (a [`Machine::snapshot`], the memory before any
    /// probe) with the program at `harness`, and returns what they did.
    pub fn run(
        &self,
        image: &[u8],
        probes: &[Probe],
        harness: Harness,
    ) -> Result<Results, OracleError> {
        if probes.len() > MAX_PROBES {
            return Err(OracleError::TooManyProbes {
                count: probes.len(),
                max: MAX_PROBES,
            });
        }
        if image.len() != IMAGE_SIZE as usize {
            return Err(OracleError::Memory(format!(
                "image of {} bytes, expected {IMAGE_SIZE}",
                image.len()
            )));
        }
        let results_path = self.dir.join("results.bin");
        let name = results_path.to_string_lossy().into_owned();
        if name.len() >= FILE_NAME_MAX {
            return Err(OracleError::Memory(format!("path {name} is too long")));
        }
        let _ = std::fs::remove_file(&results_path);
        let mut image = image.to_vec();
        let mut put = |pa: u64, bytes: &[u8]| {
            let at = (pa - IMAGE_BASE) as usize;
            image[at..at + bytes.len()].copy_from_slice(bytes);
        };
        for (index, p) in probes.iter().enumerate() {
            let fits = match p.op {
                ProbeOp::Load | ProbeOp::Store | ProbeOp::Fetch => true,
                ProbeOp::Stage2Switch | ProbeOp::Stage1Switch { .. } => harness == Harness::Stage2,
                _ => harness != Harness::Stage2,
            };
            if !fits {
                return Err(OracleError::BadProbe {
                    index,
                    why: "the op does not run in this harness",
                });
            }
        }
        let program = match harness {
            Harness::Stage2 => crate::el2::program(probes.len() as u64)?,
            _ => program(probes.len() as u64, harness)?,
        };
        let program = Asm::bytes(&program);
        if program.len() as u64 > PROGRAM_BYTES {
            return Err(OracleError::Asm(AsmError::Immediate(program.len() as u64)));
        }
        put(VECTORS, &program);
        let dump_len = (TABLES.1 - RESULTS) as usize;
        let words = [
            (OPEN_BLOCK, [FILE_NAME, MODE_WB, name.len() as u64]),
            (WRITE_BLOCK, [0, RESULTS, dump_len as u64]),
            (EXIT_OK, [APPLICATION_EXIT, 0, 0]),
            (EXIT_FAIL, [APPLICATION_EXIT, 1, 0]),
        ];
        for (pa, w) in words {
            put(
                pa,
                &w.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>(),
            );
        }
        put(CLOSE_BLOCK, &[0; 8]);
        put(FILE_NAME, name.as_bytes());
        put(FILE_NAME + name.len() as u64, &[0]);
        for (index, p) in probes.iter().enumerate() {
            if let ProbeOp::Switch { ttbr1, .. } = p.op {
                if ttbr1 & 0xfff != 0 {
                    return Err(OracleError::BadProbe {
                        index,
                        why: "TTBR1 is not 4 KiB aligned",
                    });
                }
            }
        }
        for (i, p) in probes.iter().enumerate() {
            let last = match p.op {
                // TTBR1 (4 KiB aligned) with PAN in bit 0 and WXN in bit 1.
                ProbeOp::Switch { pan, wxn, ttbr1 } => {
                    let ttbr1 = if ttbr1 == 0 { BOOT_TABLE } else { ttbr1 };
                    ttbr1 | u64::from(pan) | (u64::from(wxn) << 1)
                }
                ProbeOp::Stage1Switch { enable } => u64::from(enable),
                _ => p.check_pa,
            };
            let rec = [p.op.code(), p.va, p.value, last];
            let rec: Vec<u8> = rec.iter().flat_map(|x| x.to_le_bytes()).collect();
            put(PROBES + 32 * i as u64, &rec);
        }
        put(RESULTS, &vec![0; (BOOT_L2 - RESULTS) as usize]);
        let image_path = self.dir.join("image.bin");
        std::fs::write(&image_path, &image).map_err(io("writing the image"))?;

        let mut cmd = Command::new(&self.qemu);
        // VSVA_QEMU_ORACLE_TRACE=1 keeps QEMU's exception log next to the image.
        if std::env::var_os("VSVA_QEMU_ORACLE_TRACE").is_some() {
            cmd.args(["-d", "int,guest_errors,unimp", "-D"])
                .arg(self.dir.join("qemu.log"));
        }
        let child = cmd
            .args([
                "-M",
                match harness {
                    Harness::Stage2 => "virt,virtualization=on",
                    _ => "virt",
                },
            ])
            .args(["-cpu", "max", "-accel", "tcg", "-smp", "1"])
            .args(["-m", &format!("{}M", RAM_SIZE >> 20)])
            .args(["-nodefaults", "-display", "none", "-monitor", "none"])
            .args([
                "-serial",
                "none",
                "-semihosting-config",
                "enable=on,target=native",
            ])
            .arg("-device")
            .arg(format!(
                "loader,file={},addr={IMAGE_BASE:#x},force-raw=on",
                image_path.display()
            ))
            .arg("-device")
            .arg(format!("loader,addr={ENTRY:#x},cpu-num=0"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io("starting qemu-system-aarch64"))?;
        let (status, stderr) = match wait_bounded(child, TIMEOUT).map_err(io("waiting for qemu"))? {
            Ended::Exited { status, stderr } => (status, stderr),
            Ended::TimedOut => return Err(OracleError::Timeout(TIMEOUT)),
        };
        if !status.success() {
            return Err(OracleError::QemuFailed {
                status: status.to_string(),
                stderr,
            });
        }
        let dump = std::fs::read(&results_path).map_err(io("reading the results"))?;
        if dump.len() != dump_len {
            return Err(OracleError::BadResults(dump.len(), dump_len));
        }
        let word = |off: usize| u64::from_le_bytes(dump[off..off + 8].try_into().unwrap_or([0; 8]));
        let features = Features {
            mmfr0: word(0),
            mmfr1: word(8),
            current_el: word(16),
        };
        let outcomes = (0..probes.len())
            .map(|i| {
                let rec = HEADER as usize + 32 * i;
                if word(rec) != 0 {
                    Outcome::Abort(Abort {
                        esr: word(rec + 8),
                        far: word(rec + 16),
                        hpfar: word(rec + 24),
                    })
                } else {
                    Outcome::Done(word(rec + 24))
                }
            })
            .collect();
        let tables = dump[(TABLES.0 - RESULTS) as usize..].to_vec();
        Ok(Results {
            features,
            outcomes,
            tables,
        })
    }
}

// Registers: x19 the probe, x20 its result record, x21 probes left, x22 the results fd,
// x30 the return address of a fetch probe.

/// The EL1 program for `count` probes run from `harness`, to be placed at
/// [`layout::VECTORS`] (entry at [`layout::ENTRY`]).
fn program(count: u64, harness: Harness) -> Result<Vec<u32>, AsmError> {
    // The VA of physical address 0 while probing.
    let base = harness.base();
    let mut a = Asm::new();
    // 16 vector entries of 0x80 bytes: each records the exception in x20's record and
    // returns past the faulting instruction.
    // An Instruction Abort (EC 0x21, or 0x20 from EL0) returns to X30: past the BLR of a
    // fetch probe. An SVC from EL0 (EC 0x15) ends an EL0 fetch: back to X23 at EL1 with
    // SPSR X24, recording nothing.
    for slot in 0..16 {
        a.pad_to(slot * 0x80);
        a.mrs(X9, SysReg::ESR_EL1);
        a.mrs(X10, SysReg::FAR_EL1);
        let (fetch, svc) = (a.label(), a.label());
        a.lsr_imm(X11, X9, 26);
        a.cmp_imm(X11, 0x15);
        a.b_cond(Cond::Eq, svc);
        a.movz(X12, 1, 0);
        a.str(X12, X20, 0);
        a.str(X9, X20, 8);
        a.str(X10, X20, 16);
        a.cmp_imm(X11, 0x21);
        a.b_cond(Cond::Eq, fetch);
        a.cmp_imm(X11, 0x20);
        a.b_cond(Cond::Eq, fetch);
        a.mrs(X9, SysReg::ELR_EL1);
        a.add_imm(X9, X9, 4);
        a.msr(SysReg::ELR_EL1, X9);
        a.eret();
        a.bind(fetch);
        a.msr(SysReg::ELR_EL1, X30);
        a.eret();
        a.bind(svc);
        a.msr(SysReg::ELR_EL1, X23);
        a.msr(SysReg::SPSR_EL1, X24);
        a.eret();
    }
    a.pad_to(ENTRY - VECTORS);
    // MMU off, at the physical address.
    record_features(&mut a);
    a.mov_imm(X0, MAIR);
    a.msr(SysReg::MAIR_EL1, X0);
    boot_map(&mut a);
    a.mov_imm(X0, base + VECTORS);
    a.msr(SysReg::VBAR_EL1, X0);
    a.tlbi_vmalle1();
    a.dsb_sy();
    a.isb();
    a.mov_imm(X0, SCTLR);
    a.msr(SysReg::SCTLR_EL1, X0);
    a.isb();
    // Still on the identity map: continue at the TTBR1 alias.
    let high = a.label();
    let high_at = a.offset() + 5 * 4;
    a.mov_imm(X0, base + VECTORS + high_at);
    while a.offset() < high_at - 4 {
        a.nop();
    }
    a.br(X0);
    a.bind(high);
    if a.offset() != high_at {
        return Err(AsmError::Immediate(high_at));
    }
    a.mov_imm(X19, base + PROBES);
    a.mov_imm(X20, base + RESULTS + HEADER);
    a.mov_imm(X21, count);
    let next_probe = a.label();
    let done = a.label();
    let (load, store, ldtr, sttr, keep, next) = (
        a.label(),
        a.label(),
        a.label(),
        a.label(),
        a.label(),
        a.label(),
    );
    probe_loop_head(&mut a, next_probe, done);
    // Every probe walks the tables afresh, as the walker does: no translation the CPU
    // cached before its own AF or dirty-state update (or an earlier probe's) is used.
    a.tlbi_vmalle1();
    a.dsb_sy();
    a.isb();
    let (fetch, fetch_el0) = (a.label(), a.label());
    for (code, l) in [
        (0, load),
        (1, store),
        (2, ldtr),
        (3, sttr),
        (5, fetch),
        (6, fetch_el0),
    ] {
        a.cmp_imm(X1, code);
        a.b_cond(Cond::Eq, l);
    }
    // Switch. From the identity map the program turns the MMU off first (it runs at its
    // physical address either way), so that no fetch sees a TTBR0 paired with another
    // scenario's TCR; the SCTLR_EL1 write below turns it back on.
    if harness == Harness::Identity {
        a.mov_imm(X4, SCTLR & !1);
        a.msr(SysReg::SCTLR_EL1, X4);
        a.isb();
    }
    a.msr(SysReg::TTBR0_EL1, X0);
    a.msr(SysReg::TCR_EL1, X2);
    // The last word: TTBR1 with PAN in bit 0, WXN in bit 1.
    a.ldr(X3, X19, 24);
    a.lsr_imm(X4, X3, 2);
    a.lsl_imm(X4, X4, 2);
    a.msr(SysReg::TTBR1_EL1, X4);
    a.lsl_imm(X3, X3, 62);
    a.lsr_imm(X3, X3, 62);
    let set = a.label();
    let cases: Vec<_> = (0..4).map(|_| a.label()).collect();
    for (code, &l) in cases.iter().enumerate() {
        a.cmp_imm(X3, code as u64);
        a.b_cond(Cond::Eq, l);
    }
    for (code, &l) in cases.iter().enumerate() {
        a.bind(l);
        a.msr_pan(code & 1 != 0);
        a.mov_imm(X24, 0x3c5 | (((code as u64) & 1) << 22));
        a.mov_imm(X4, SCTLR | (((code as u64) >> 1) << 19));
        a.msr(SysReg::SCTLR_EL1, X4);
        a.b(set);
    }
    a.bind(set);
    a.tlbi_vmalle1();
    a.dsb_sy();
    a.isb();
    a.b(next);
    a.bind(load);
    a.ldr(X3, X0, 0);
    a.b(keep);
    a.bind(store);
    a.str(X2, X0, 0);
    a.b(next);
    a.bind(ldtr);
    a.ldtr(X3, X0);
    a.b(keep);
    a.bind(sttr);
    a.sttr(X2, X0);
    a.b(next);
    a.bind(fetch);
    a.blr(X0);
    a.b(keep);
    // EL0: ERET to the stub with X23/X24 the way back (SPSR: EL1h, DAIF masked, PAN as
    // it is).
    let back = a.label();
    a.bind(fetch_el0);
    let start = a.offset();
    let back_at = start + 48;
    a.mov_imm(X23, base + VECTORS + back_at);
    a.pad_to(start + 16);
    a.mov_imm(X4, base + EL0_STUB);
    a.pad_to(start + 32);
    a.msr(SysReg::ELR_EL1, X4);
    a.movz(X4, 0x3c0, 0);
    a.msr(SysReg::SPSR_EL1, X4);
    a.eret();
    a.bind(back);
    if a.offset() != back_at {
        return Err(AsmError::Immediate(back_at));
    }
    a.b(keep);
    probe_loop_end(&mut a, (keep, next), next_probe, done);
    // Back to the identity map, then to the physical address (from the identity harness,
    // with the MMU off: the read-back below is of physical addresses either way).
    if harness == Harness::Identity {
        a.mov_imm(X4, SCTLR & !1);
        a.msr(SysReg::SCTLR_EL1, X4);
        a.isb();
    }
    boot_map(&mut a);
    a.tlbi_vmalle1();
    a.dsb_sy();
    a.isb();
    let low = a.label();
    let low_at = a.offset() + 5 * 4;
    a.mov_imm(X0, VECTORS + low_at);
    while a.offset() < low_at - 4 {
        a.nop();
    }
    a.br(X0);
    a.bind(low);
    if a.offset() != low_at {
        return Err(AsmError::Immediate(low_at));
    }
    read_back_and_exit(&mut a, count);
    // The EL0 stub: call the probe's VA, then SVC back to EL1.
    a.pad_to(EL0_STUB - VECTORS);
    a.blr(X0);
    a.svc(0);
    a.finish()
}

/// The start of either program, with the MMU off: X20 at the header's spare record (an
/// exception before the first probe is recorded there), then ID_AA64MMFR0_EL1,
/// ID_AA64MMFR1_EL1 and CurrentEL in the header's first three words.
pub(crate) fn record_features(a: &mut Asm) {
    a.mov_imm(X20, RESULTS + 32);
    a.mov_imm(X1, RESULTS);
    a.mrs(X0, SysReg::ID_AA64MMFR0_EL1);
    a.str(X0, X1, 0);
    a.mrs(X0, SysReg::ID_AA64MMFR1_EL1);
    a.str(X0, X1, 8);
    a.mrs(X0, SysReg::CURRENT_EL);
    a.str(X0, X1, 16);
}

/// The head of either program's probe loop, bound at `next_probe`: to `done` when X21
/// probes are left no more, else the probe at X19 loaded (X1 its op, X0 its address, X2
/// its value) and X3 cleared.
pub(crate) fn probe_loop_head(a: &mut Asm, next_probe: Label, done: Label) {
    a.bind(next_probe);
    a.cbz(X21, done);
    a.ldr(X1, X19, 0);
    a.ldr(X0, X19, 8);
    a.ldr(X2, X19, 16);
    a.movz(X3, 0, 0);
}

/// The end of either program's probe loop: `keep` stores X3 as the probe's value, `next`
/// steps to the next probe ([`step_probe`]), back to `next_probe`; `done` is bound after
/// it.
pub(crate) fn probe_loop_end(
    a: &mut Asm,
    (keep, next): (Label, Label),
    next_probe: Label,
    done: Label,
) {
    a.bind(keep);
    a.str(X3, X20, 24);
    a.bind(next);
    step_probe(a, next_probe);
    a.bind(done);
}

/// X19 and X20 to the next probe and its record, X21 counted down, then to `back`.
fn step_probe(a: &mut Asm, back: Label) {
    a.add_imm(X19, X19, 32);
    a.add_imm(X20, X20, 32);
    a.subs_imm(X21, X21, 1);
    a.b(back);
}

/// The end of a run, with the MMU off (or through the identity map): reads back each
/// store's check address into its record, writes the results and the tables to the file
/// through semihosting, and exits.
pub(crate) fn read_back_and_exit(a: &mut Asm, count: u64) {
    // Read back each store's check address.
    a.mov_imm(X19, PROBES);
    a.mov_imm(X20, RESULTS + HEADER);
    a.mov_imm(X21, count);
    let (rb, rb_next, rb_done) = (a.label(), a.label(), a.label());
    a.bind(rb);
    a.cbz(X21, rb_done);
    // A switch's last word is its PAN or stage-1 enable, not an address.
    a.ldr(X1, X19, 0);
    a.cmp_imm(
        X1,
        ProbeOp::Switch {
            pan: false,
            wxn: false,
            ttbr1: 0,
        }
        .code(),
    );
    a.b_cond(Cond::Eq, rb_next);
    a.cmp_imm(X1, ProbeOp::Stage1Switch { enable: false }.code());
    a.b_cond(Cond::Eq, rb_next);
    a.ldr(X0, X19, 24);
    a.cbz(X0, rb_next);
    a.ldr(X3, X0, 0);
    a.str(X3, X20, 24);
    a.bind(rb_next);
    step_probe(a, rb);
    a.bind(rb_done);
    // Write the results and the tables to the file, and exit.
    let fail = a.label();
    a.mov_imm(X0, SYS_OPEN);
    a.mov_imm(X1, OPEN_BLOCK);
    a.hlt(0xf000);
    a.mov(X22, X0);
    a.add_imm(X1, X0, 1);
    a.cbz(X1, fail);
    a.mov_imm(X1, WRITE_BLOCK);
    a.str(X22, X1, 0);
    a.mov_imm(X0, SYS_WRITE);
    a.hlt(0xf000);
    a.cbnz(X0, fail);
    a.mov_imm(X1, CLOSE_BLOCK);
    a.str(X22, X1, 0);
    a.mov_imm(X0, SYS_CLOSE);
    a.hlt(0xf000);
    a.cbnz(X0, fail);
    a.mov_imm(X1, EXIT_OK);
    a.mov_imm(X0, SYS_EXIT);
    a.hlt(0xf000);
    a.bind(fail);
    a.mov_imm(X1, EXIT_FAIL);
    a.mov_imm(X0, SYS_EXIT);
    a.hlt(0xf000);
    a.b(fail);
}

/// TTBR0 and TTBR1 = the boot table with T0SZ = T1SZ = 25: the identity map of the first
/// GiB of RAM and its alias at [`layout::HIGH`].
fn boot_map(a: &mut Asm) {
    a.mov_imm(X0, BOOT_TABLE);
    a.msr(SysReg::TTBR0_EL1, X0);
    a.msr(SysReg::TTBR1_EL1, X0);
    a.mov_imm(X0, tcr(BOOT_TSZ as u8, 0, false, false));
    a.msr(SysReg::TCR_EL1, X0);
}
