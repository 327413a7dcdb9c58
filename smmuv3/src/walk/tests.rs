use super::*;
use crate::builder::TableBuilder;
use crate::desc::{Descriptor as D, TableFormat};
use crate::ste::Granule;
use crate::testutil::TestMemory;
use proptest::prelude::*;
use {vsva_mem::MemError, vsva_mem::PhysMem};

const MB: u64 = 1 << 20;
const GB: u64 = 1 << 30;

/// Stage-1 leaf attributes: AF, readable and writable at both privileges.
const S1_RW_EL0: u64 = D::AF | D::AP_EL0;
/// Stage-2 leaf attributes: AF, S2AP = RW, normal write-back memory.
const S2_RW: u64 = D::AF | D::S2AP_R | D::S2AP_W | (0xf << 2);

/// Table frames handed out from `[next, end)`.
struct Bump {
    next: u64,
    end: u64,
}

impl Bump {
    fn alloc(&mut self) -> Option<u64> {
        (self.next < self.end).then(|| {
            self.next += 4096;
            self.next - 4096
        })
    }
}

/// A memory seen at an offset: address `a` is `base + a` of `inner` (the guest's IPA view
/// of its stage-1 tables when stage 2 maps IPA `a` to PA `base + a`).
struct Offset<'a> {
    inner: &'a TestMemory,
    base: u64,
}

impl PhysMem for Offset<'_> {
    fn read_u64(&self, addr: u64) -> Result<u64, MemError> {
        self.inner.read_u64(self.base + addr)
    }
    fn fetch_or_u64(&self, addr: u64, bits: u64) -> Result<u64, MemError> {
        self.inner.fetch_or_u64(self.base + addr, bits)
    }
    fn compare_exchange_u64(&self, addr: u64, old: u64, new: u64) -> Result<u64, MemError> {
        self.inner.compare_exchange_u64(self.base + addr, old, new)
    }
    fn write_u64(&self, addr: u64, value: u64) -> Result<(), MemError> {
        self.inner.write_u64(self.base + addr, value)
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.inner.read(self.base + addr, buf)
    }
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemError> {
        self.inner.write(self.base + addr, buf)
    }
}

// ---------------------------------------------------------------------------------------
// Stage 1

/// A stage-1 table in 8 MiB of test memory: TTB0 at 0x1000, table frames from 1 MiB.
struct S1 {
    mem: TestMemory,
    cfg: S1Config,
    tables: TableBuilder,
    frames: Bump,
}

impl S1 {
    fn new(t0sz: u8, flags: S1Flags) -> Self {
        let cfg = S1Config::new(0x1000, t0sz, AddressSize::Bits48, flags).unwrap();
        S1 {
            mem: TestMemory::new(8 * MB),
            tables: TableBuilder::stage1(&cfg),
            cfg,
            frames: Bump {
                next: MB,
                end: 8 * MB,
            },
        }
    }

    fn map(&mut self, va: u64, pa: u64, size: PageSize, attrs: u64) {
        let frames = &mut self.frames;
        self.tables
            .map(&self.mem, &mut || frames.alloc(), va, pa, size, attrs)
            .unwrap();
    }

    fn slot(&self, va: u64, level: u8) -> u64 {
        self.tables
            .descriptor_address(&self.mem, va, level)
            .unwrap()
            .unwrap()
    }

    fn desc(&self, va: u64, level: u8) -> u64 {
        self.mem.read_u64(self.slot(va, level)).unwrap()
    }

    fn set(&self, va: u64, level: u8, value: u64) {
        self.mem.write_u64(self.slot(va, level), value).unwrap();
    }

    fn walk(&self, va: u64, access: AccessRequest) -> Result<Translation, WalkFault> {
        walk_stage1(&self.mem, &self.cfg, va, access, &mut ())
    }

    fn record(
        &self,
        va: u64,
        access: AccessRequest,
    ) -> (Result<Translation, WalkFault>, WalkRecord) {
        let mut rec = WalkRecord::default();
        let r = walk_stage1(&self.mem, &self.cfg, va, access, &mut rec);
        (r, rec)
    }
}

fn fault(r: Result<Translation, WalkFault>) -> (FaultKind, FaultStage, u8) {
    let f = r.unwrap_err();
    (f.kind, f.stage, f.level)
}

const VA: u64 = 0x40_4060_0000;

#[test]
fn stage1_hand_computed_walk() {
    // T0SZ = 25: a 39-bit VA, start level 1 (512 entries of 1 GiB).
    let mem = TestMemory::new(MB);
    let cfg = S1Config::new(0x1000, 25, AddressSize::Bits48, S1Flags::default()).unwrap();
    assert_eq!(cfg.start_level(), 1);
    let va = 0x40_2030_1234u64;
    // L1 index = VA[38:30] = 0x100, L2 index = VA[29:21] = 0x101, L3 index = VA[20:12] = 0x101.
    mem.write_u64(0x1000 + 0x100 * 8, 0x2003).unwrap();
    mem.write_u64(0x2000 + 0x101 * 8, 0x3003).unwrap();
    // Page at 0x8765_4000: AF, AP = 01, bits[1:0] = 11.
    mem.write_u64(0x3000 + 0x101 * 8, 0x8765_4443).unwrap();
    let mut rec = WalkRecord::default();
    let t = walk_stage1(&mem, &cfg, va, AccessRequest::WRITE, &mut rec).unwrap();
    assert_eq!(t.output, 0x8765_4234);
    assert_eq!(t.page_size, PageSize::Size4K);
    assert_eq!(
        t.perms,
        Permissions {
            read: true,
            write: true,
            execute: true
        }
    );
    assert!(t.dirty);
    let addrs: Vec<(u8, u64)> = rec
        .steps
        .iter()
        .map(|s| (s.level, s.entry_address))
        .collect();
    assert_eq!(addrs, [(1, 0x1800), (2, 0x2808), (3, 0x3808)]);
    assert_eq!(
        rec.to_string(),
        "S1 L1 input 0x4020301234: table 0x1000 desc@0x1800 = 0x0000000000002003 -> table 0x2000\n\
         S1 L2 input 0x4020301234: table 0x2000 desc@0x2808 = 0x0000000000003003 -> table 0x3000\n\
         S1 L3 input 0x4020301234: table 0x3000 desc@0x3808 = 0x0000000087654443 -> Size4K at 0x87654000\n"
    );
}

#[test]
fn stage1_start_level_follows_t0sz() {
    for (t0sz, start) in [(16, 0), (24, 0), (25, 1), (33, 1), (34, 2), (39, 2)] {
        let cfg = S1Config::new(0, t0sz, AddressSize::Bits48, S1Flags::default()).unwrap();
        assert_eq!(cfg.start_level(), start, "T0SZ {t0sz}");
    }
    for t0sz in [0, 15, 40, 63] {
        assert_eq!(
            S1Config::new(0, t0sz, AddressSize::Bits48, S1Flags::default()),
            Err(TableConfigError::T0sz(t0sz))
        );
    }
    // TTB0 bits below the start table's size are ignored: T0SZ 24 leaves 1 bit (16 bytes)
    // at level 0, T0SZ 16 a full 4 KiB table.
    let small = S1Config::new(0x1238, 24, AddressSize::Bits48, S1Flags::default()).unwrap();
    assert_eq!(small.root(), 0x1230);
    let full = S1Config::new(0x1238, 16, AddressSize::Bits48, S1Flags::default()).unwrap();
    assert_eq!(full.root(), 0x1000);
}

#[test]
fn stage1_every_block_size_and_start_level() {
    for t0sz in [16u8, 25, 34] {
        for size in PageSize::ALL
            .into_iter()
            .filter(|s| s.granule() == Granule::Size4K)
        {
            let mut s = S1::new(t0sz, S1Flags::default());
            let va = VA & ((1 << (64 - t0sz)) - 1) & !(size.bytes() - 1);
            if size.level() < s.cfg.start_level() {
                let frames = &mut s.frames;
                assert_eq!(
                    s.tables
                        .map(&s.mem, &mut || frames.alloc(), va, 0, size, S1_RW_EL0),
                    Err(crate::builder::BuildError::SizeAboveStart(size))
                );
                continue;
            }
            let pa = 5 * GB;
            s.map(va, pa, size, S1_RW_EL0);
            let off = size.bytes() - 8;
            let (t, rec) = s.record(va + off, AccessRequest::READ);
            let t = t.unwrap();
            assert_eq!((t.output, t.page_base(), t.page_size), (pa + off, pa, size));
            let walked = size.level() - s.cfg.start_level() + 1;
            assert_eq!(rec.steps.len(), walked as usize, "T0SZ {t0sz} {size:?}");
            for (i, step) in rec.steps.iter().enumerate() {
                assert_eq!(step.level, s.cfg.start_level() + i as u8);
                assert_eq!(step.stage, Stage::Stage1);
                assert_eq!((step.set_bits, step.cleared_bits), (0, 0));
            }
            assert_eq!(
                rec.steps.last().unwrap().outcome,
                StepOutcome::Leaf { base: pa, size }
            );
            // Just past the block is unmapped.
            if va + size.bytes() < 1 << (64 - t0sz) {
                assert_eq!(
                    fault(s.walk(va + size.bytes(), AccessRequest::READ)).0,
                    FaultKind::Translation
                );
            }
        }
    }
}

#[test]
fn builder_lookup_and_unmap() {
    let mut s = S1::new(16, S1Flags::default());
    s.map(VA, 0x4000_0000, PageSize::Size2M, S1_RW_EL0);
    let m = s.tables.lookup(&s.mem, VA + 0x1234).unwrap().unwrap();
    assert_eq!((m.base, m.size), (0x4000_0000, PageSize::Size2M));
    assert_eq!(
        m.descriptor,
        D::leaf(0x4000_0000, PageSize::Size2M, S1_RW_EL0).0
    );
    assert_eq!(s.tables.lookup(&s.mem, VA + (2 << 20)), Ok(None));
    // The wrong size, a misaligned address or an unmapped one change nothing.
    let frames = s.tables.tables().len();
    for (va, size) in [
        (VA, PageSize::Size4K),
        (VA + 0x1000, PageSize::Size2M),
        (VA + (4 << 20), PageSize::Size2M),
    ] {
        assert!(
            s.tables.unmap(&s.mem, va, size).is_err(),
            "{va:#x} {size:?}"
        );
    }
    assert!(s.walk(VA, AccessRequest::READ).is_ok());
    assert_eq!(s.tables.unmap(&s.mem, VA, PageSize::Size2M), Ok(m));
    assert_eq!(
        fault(s.walk(VA, AccessRequest::READ)),
        (FaultKind::Translation, FaultStage::Stage1, 2)
    );
    assert_eq!(s.tables.lookup(&s.mem, VA), Ok(None));
    // The slot can hold something else now; no table was added or removed.
    s.map(VA, 0x9000, PageSize::Size4K, S1_RW_EL0);
    assert_eq!(s.walk(VA, AccessRequest::READ).unwrap().output, 0x9000);
    assert_eq!(s.tables.tables().len(), frames + 1);
    assert_eq!(
        s.tables.unmap(&s.mem, 1 << 60, PageSize::Size4K),
        Err(crate::builder::BuildError::OutOfRange(1 << 60))
    );
}

#[test]
fn stage1_translation_faults() {
    let mut s = S1::new(16, S1Flags::default());
    s.map(VA, 0x5000, PageSize::Size4K, S1_RW_EL0);
    // An invalid descriptor at each level.
    for level in 0..=3 {
        let saved = s.desc(VA, level);
        s.set(VA, level, saved & !D::VALID);
        let (r, rec) = s.record(VA, AccessRequest::READ);
        assert_eq!(
            fault(r),
            (FaultKind::Translation, FaultStage::Stage1, level)
        );
        assert_eq!(rec.steps.len(), level as usize + 1);
        assert_eq!(
            rec.steps.last().unwrap().outcome,
            StepOutcome::Fault(FaultKind::Translation)
        );
        s.set(VA, level, saved);
    }
    // A block descriptor at level 0 and the reserved level-3 encoding are invalid.
    let l0 = s.desc(VA, 0);
    s.set(VA, 0, 0x0000_0080_0000_0401);
    assert_eq!(
        fault(s.walk(VA, AccessRequest::READ)),
        (FaultKind::Translation, FaultStage::Stage1, 0)
    );
    s.set(VA, 0, l0);
    s.set(VA, 3, 0x5000 | D::AF | D::AP_EL0 | D::VALID);
    assert_eq!(
        fault(s.walk(VA, AccessRequest::READ)),
        (FaultKind::Translation, FaultStage::Stage1, 3)
    );
    // A VA above the 48-bit range (the TTB1 half included) faults before any read.
    for va in [1 << 48, 0xffff_8000_0000_0000, 0xff00_0000_0000_1000] {
        let (r, rec) = s.record(va, AccessRequest::READ);
        let f = r.unwrap_err();
        assert_eq!((f.kind, f.level, f.input), (FaultKind::Translation, 0, va));
        assert!(rec.steps.is_empty());
    }
    // EPD0 disables TTB0 walks.
    let off = S1::new(
        16,
        S1Flags {
            epd0: true,
            ..S1Flags::default()
        },
    );
    assert_eq!(
        fault(off.walk(0, AccessRequest::READ)).0,
        FaultKind::Translation
    );
}

#[test]
fn stage1_top_byte_ignore() {
    let tbi = S1Flags {
        tbi: true,
        ..S1Flags::default()
    };
    let mut s = S1::new(16, tbi);
    s.map(VA, 0x5000, PageSize::Size4K, S1_RW_EL0);
    assert_eq!(
        s.walk(0xab00_0000_0000_0000 | VA, AccessRequest::READ)
            .unwrap()
            .output,
        0x5000
    );
    // Bits 55:48 still count.
    assert!(!s.cfg.in_range(1 << 55 | VA));
    let plain = S1::new(16, S1Flags::default());
    assert!(!plain.cfg.in_range(0xab00_0000_0000_0000 | VA));
}

#[test]
fn stage1_address_size_faults() {
    let mut s = S1::new(16, S1Flags::default());
    s.cfg = S1Config::new(0x1000, 16, AddressSize::Bits32, S1Flags::default()).unwrap();
    assert_eq!(s.cfg.output_bits(), 32);
    s.map(VA, 1 << 32, PageSize::Size4K, S1_RW_EL0);
    // The leaf's output is at 4 GiB, beyond 32 bits.
    assert_eq!(
        fault(s.walk(VA, AccessRequest::READ)),
        (FaultKind::AddrSize, FaultStage::Stage1, 3)
    );
    // A table descriptor pointing beyond 32 bits faults at its own level.
    let l1 = s.desc(VA, 1);
    s.set(VA, 1, l1 | 1 << 40);
    assert_eq!(
        fault(s.walk(VA, AccessRequest::READ)),
        (FaultKind::AddrSize, FaultStage::Stage1, 1)
    );
    // TTB0 beyond the output size: level 0, before any read.
    let high = S1Config::new(1 << 33, 16, AddressSize::Bits32, S1Flags::default()).unwrap();
    let mut rec = WalkRecord::default();
    let f = walk_stage1(&s.mem, &high, VA, AccessRequest::READ, &mut rec).unwrap_err();
    assert_eq!((f.kind, f.level), (FaultKind::AddrSize, 0));
    assert!(rec.steps.is_empty());
    // IPS 52 is 48 bits with the 4 KiB granule.
    let wide = S1Config::new(0, 16, AddressSize::Bits52, S1Flags::default()).unwrap();
    assert_eq!(wide.output_bits(), 48);
}

#[test]
fn stage1_access_flag() {
    let mut s = S1::new(16, S1Flags::default());
    s.map(VA, 0x5000, PageSize::Size4K, D::AP_EL0);
    // HA = 0: an Access fault, which takes priority over the Permission fault that a
    // privileged fetch of this EL0-writable page also deserves.
    let (r, rec) = s.record(VA, AccessRequest::FETCH.privileged());
    assert_eq!(fault(r), (FaultKind::Access, FaultStage::Stage1, 3));
    assert_eq!(
        rec.steps.last().unwrap().outcome,
        StepOutcome::Fault(FaultKind::Access)
    );
    assert_eq!(s.desc(VA, 3) & D::AF, 0);
    // AFFD: no fault, no update.
    s.cfg = S1Config::new(
        0x1000,
        16,
        AddressSize::Bits48,
        S1Flags {
            affd: true,
            ..S1Flags::default()
        },
    )
    .unwrap();
    assert!(s.walk(VA, AccessRequest::READ).is_ok());
    assert_eq!(s.desc(VA, 3) & D::AF, 0);
    // HA = 1: hardware sets AF once the access is allowed.
    s.cfg = S1Config::new(
        0x1000,
        16,
        AddressSize::Bits48,
        S1Flags {
            ha: true,
            ..S1Flags::default()
        },
    )
    .unwrap();
    assert_eq!(
        fault(s.walk(VA, AccessRequest::FETCH.privileged())).0,
        FaultKind::Permission
    );
    assert_eq!(s.desc(VA, 3) & D::AF, 0, "no update for a refused access");
    let (r, rec) = s.record(VA, AccessRequest::READ);
    assert!(r.is_ok());
    assert_eq!(rec.steps.last().unwrap().set_bits, D::AF);
    assert_ne!(s.desc(VA, 3) & D::AF, 0);
    let (_, rec) = s.record(VA, AccessRequest::READ);
    assert!(rec.steps.iter().all(|s| s.set_bits == 0));
}

/// The rights of a leaf with `leaf` attributes under a table descriptor with `table`
/// controls, for each of the six accesses: (read, write, fetch) unprivileged then privileged.
fn rights(flags: S1Flags, table: u64, leaf: u64) -> [bool; 6] {
    let mut s = S1::new(16, flags);
    s.map(VA, 0x5000, PageSize::Size4K, leaf);
    let l2 = s.desc(VA, 2);
    s.set(VA, 2, l2 | table);
    let accesses = [
        AccessRequest::READ,
        AccessRequest::WRITE,
        AccessRequest::FETCH,
        AccessRequest::READ.privileged(),
        AccessRequest::WRITE.privileged(),
        AccessRequest::FETCH.privileged(),
    ];
    accesses.map(|a| match s.walk(VA, a) {
        Ok(t) => {
            assert!(t.perms.allow(a));
            true
        }
        Err(f) => {
            assert_eq!((f.kind, f.level), (FaultKind::Permission, 3));
            false
        }
    })
}

#[test]
fn stage1_permissions() {
    let none = S1Flags::default();
    let wxn = S1Flags { wxn: true, ..none };
    // (flags, table controls, leaf, [uR, uW, uX, pR, pW, pX])
    let cases: &[(S1Flags, u64, u64, [bool; 6])] = &[
        // AP = 00: privileged read/write; a privileged fetch is fine, unprivileged nothing
        // but fetch (execute-only is allowed at EL0).
        (none, 0, D::AF, [false, false, true, true, true, true]),
        // AP = 01: read/write at both; EL0-writable pages are never privileged-executable.
        (
            none,
            0,
            D::AF | D::AP_EL0,
            [true, true, true, true, true, false],
        ),
        // AP = 10: privileged read-only.
        (
            none,
            0,
            D::AF | D::AP_RO,
            [false, false, true, true, false, true],
        ),
        // AP = 11: read-only at both.
        (
            none,
            0,
            D::AF | D::AP_RO | D::AP_EL0,
            [true, false, true, true, false, true],
        ),
        // UXN and PXN.
        (
            none,
            0,
            D::AF | D::AP_RO | D::AP_EL0 | D::UXN,
            [true, false, false, true, false, true],
        ),
        (
            none,
            0,
            D::AF | D::AP_RO | D::AP_EL0 | D::PXN,
            [true, false, true, true, false, false],
        ),
        // APTable[1]: read-only below; then the page is not EL0-writable, so privileged
        // fetches are allowed again.
        (
            none,
            D::AP_TABLE_RO,
            D::AF | D::AP_EL0,
            [true, false, true, true, false, true],
        ),
        // APTable[0]: no unprivileged access below.
        (
            none,
            D::AP_TABLE_NO_EL0,
            D::AF | D::AP_EL0,
            [false, false, true, true, true, true],
        ),
        // UXNTable, PXNTable.
        (
            none,
            D::UXN_TABLE,
            D::AF | D::AP_RO | D::AP_EL0,
            [true, false, false, true, false, true],
        ),
        (
            none,
            D::PXN_TABLE,
            D::AF | D::AP_RO | D::AP_EL0,
            [true, false, true, true, false, false],
        ),
        // WXN: writable means not executable.
        (wxn, 0, D::AF, [false, false, true, true, true, false]),
        (
            wxn,
            0,
            D::AF | D::AP_EL0,
            [true, true, false, true, true, false],
        ),
        (
            wxn,
            0,
            D::AF | D::AP_RO | D::AP_EL0,
            [true, false, true, true, false, true],
        ),
    ];
    for (i, &(flags, table, leaf, want)) in cases.iter().enumerate() {
        assert_eq!(
            rights(flags, table, leaf),
            want,
            "case {i}: table {table:#x} leaf {leaf:#x}"
        );
    }
}

#[test]
fn stage1_dirty_state() {
    let hd = S1Flags {
        ha: true,
        hd: true,
        ..S1Flags::default()
    };
    let clean = D::AF | D::AP_EL0 | D::AP_RO | D::DBM;
    // HD with HA: a write to a writable-clean page clears AP[2] by compare-exchange.
    let mut s = S1::new(16, hd);
    s.map(VA, 0x5000, PageSize::Size4K, clean);
    let t = s.walk(VA, AccessRequest::READ).unwrap();
    assert!(t.perms.write && !t.dirty);
    assert_ne!(s.desc(VA, 3) & D::AP_RO, 0, "a read leaves it clean");
    let (t, rec) = s.record(VA, AccessRequest::WRITE);
    let t = t.unwrap();
    assert!(t.dirty);
    let last = rec.steps.last().unwrap();
    assert_eq!((last.set_bits, last.cleared_bits), (0, D::AP_RO));
    assert_eq!(s.desc(VA, 3), (0x5000 | clean | 3) & !D::AP_RO);
    // Without HD, or with HD but not HA, DBM means nothing: a Permission fault.
    for flags in [
        S1Flags {
            ha: true,
            ..S1Flags::default()
        },
        S1Flags {
            hd: true,
            ..S1Flags::default()
        },
    ] {
        let mut s = S1::new(16, flags);
        s.map(VA, 0x5000, PageSize::Size4K, clean);
        assert_eq!(
            fault(s.walk(VA, AccessRequest::WRITE)).0,
            FaultKind::Permission
        );
        assert_ne!(s.desc(VA, 3) & D::AP_RO, 0);
    }
    // APTable read-only is not overridden by DBM.
    let mut s = S1::new(16, hd);
    s.map(VA, 0x5000, PageSize::Size4K, clean);
    let l2 = s.desc(VA, 2);
    s.set(VA, 2, l2 | D::AP_TABLE_RO);
    assert_eq!(
        fault(s.walk(VA, AccessRequest::WRITE)).0,
        FaultKind::Permission
    );
    // AF and dirty in one update.
    let mut s = S1::new(16, hd);
    s.map(VA, 0x5000, PageSize::Size4K, clean & !D::AF);
    let (_, rec) = s.record(VA, AccessRequest::WRITE);
    let last = rec.steps.last().unwrap();
    assert_eq!((last.set_bits, last.cleared_bits), (D::AF, D::AP_RO));
}

/// A memory whose compare-exchange always reports a changed descriptor the first `n` times,
/// as if software rewrote it concurrently.
struct Racy<'a> {
    inner: &'a TestMemory,
    races: std::cell::Cell<u32>,
    replacement: u64,
}

impl PhysMem for Racy<'_> {
    fn read_u64(&self, addr: u64) -> Result<u64, MemError> {
        self.inner.read_u64(addr)
    }
    fn fetch_or_u64(&self, addr: u64, bits: u64) -> Result<u64, MemError> {
        self.inner.fetch_or_u64(addr, bits)
    }
    fn compare_exchange_u64(&self, addr: u64, old: u64, new: u64) -> Result<u64, MemError> {
        if self.races.get() > 0 {
            self.races.set(self.races.get() - 1);
            self.inner.write_u64(addr, self.replacement)?;
        }
        self.inner.compare_exchange_u64(addr, old, new)
    }
    fn write_u64(&self, addr: u64, value: u64) -> Result<(), MemError> {
        self.inner.write_u64(addr, value)
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.inner.read(addr, buf)
    }
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemError> {
        self.inner.write(addr, buf)
    }
}

#[test]
fn stage1_update_reevaluates_a_changed_descriptor() {
    let flags = S1Flags {
        ha: true,
        ..S1Flags::default()
    };
    let mut s = S1::new(16, flags);
    s.map(VA, 0x5000, PageSize::Size4K, D::AP_EL0);
    // Software replaces the page with an invalid descriptor during the AF update.
    let racy = Racy {
        inner: &s.mem,
        races: std::cell::Cell::new(1),
        replacement: 0,
    };
    let f = walk_stage1(&racy, &s.cfg, VA, AccessRequest::READ, &mut ()).unwrap_err();
    assert_eq!((f.kind, f.level), (FaultKind::Translation, 3));
    // Or with another page: the walk uses the new one.
    s.set(VA, 3, D::leaf(0x5000, PageSize::Size4K, D::AP_EL0).0);
    let new = D::leaf(0x9000, PageSize::Size4K, D::AP_EL0).0;
    let racy = Racy {
        inner: &s.mem,
        races: std::cell::Cell::new(1),
        replacement: new,
    };
    let t = walk_stage1(&racy, &s.cfg, VA, AccessRequest::READ, &mut ()).unwrap();
    assert_eq!(t.output, 0x9000);
    assert_eq!(s.desc(VA, 3), new | D::AF);
}

#[test]
fn stage1_external_abort() {
    let mut s = S1::new(16, S1Flags::default());
    s.map(VA, 0x5000, PageSize::Size4K, S1_RW_EL0);
    // A table outside memory.
    s.set(VA, 2, D::table(0x1000_0000, 0).0);
    let (r, rec) = s.record(VA, AccessRequest::READ);
    let f = r.unwrap_err();
    let addr = 0x1000_0000 + ((VA >> 12) & 0x1ff) * 8;
    assert_eq!(
        (f.kind, f.stage, f.level, f.fetch_address),
        (FaultKind::WalkEabt, FaultStage::Stage1, 3, Some(addr))
    );
    assert_eq!(rec.steps.last().unwrap().entry_address, addr);
}

// ---------------------------------------------------------------------------------------
// Stage 2

/// A stage-2 table in 8 MiB of test memory: S2TTB at 64 KiB (room for 16 concatenated
/// tables), table frames from 1 MiB.
struct S2 {
    mem: TestMemory,
    cfg: S2Config,
    tables: TableBuilder,
    frames: Bump,
}

impl S2 {
    fn new(s2t0sz: u8, s2sl0: u8, flags: S2Flags) -> Self {
        let cfg = S2Config::new(0x1_0000, s2t0sz, s2sl0, AddressSize::Bits48, flags).unwrap();
        S2 {
            mem: TestMemory::new(8 * MB),
            tables: TableBuilder::stage2(&cfg),
            cfg,
            frames: Bump {
                next: MB,
                end: 8 * MB,
            },
        }
    }

    fn map(&mut self, ipa: u64, pa: u64, size: PageSize, attrs: u64) {
        let frames = &mut self.frames;
        self.tables
            .map(&self.mem, &mut || frames.alloc(), ipa, pa, size, attrs)
            .unwrap();
    }

    fn slot(&self, ipa: u64, level: u8) -> u64 {
        self.tables
            .descriptor_address(&self.mem, ipa, level)
            .unwrap()
            .unwrap()
    }

    fn walk(&self, ipa: u64, access: AccessRequest) -> Result<Translation, WalkFault> {
        walk_stage2(&self.mem, &self.cfg, ipa, access, &mut ())
    }
}

#[test]
fn stage2_start_level_and_concatenation() {
    // (S2T0SZ, S2SL0, start level, concatenated tables)
    for (t0sz, sl0, start, concat) in [
        (16, 2, 0, 1),
        (24, 2, 0, 1),
        (24, 1, 1, 2),
        (25, 1, 1, 1),
        (30, 1, 1, 1),
        (30, 0, 2, 16),
        (33, 0, 2, 2),
        (34, 0, 2, 1),
        (39, 0, 2, 1),
    ] {
        let cfg = S2Config::new(0, t0sz, sl0, AddressSize::Bits48, S2Flags::default()).unwrap();
        assert_eq!(
            (cfg.start_level(), cfg.concatenated_tables()),
            (start, concat),
            "{t0sz}/{sl0}"
        );
    }
    // Too many bits for the start level (more than 16 tables), none at all, or SL0 = 3.
    for (t0sz, sl0) in [(16, 1), (29, 0), (39, 1), (34, 2), (25, 2), (20, 3)] {
        assert_eq!(
            S2Config::new(0, t0sz, sl0, AddressSize::Bits48, S2Flags::default()),
            Err(TableConfigError::S2sl0 {
                s2sl0: sl0,
                s2t0sz: t0sz
            })
        );
    }
    assert_eq!(
        S2Config::new(0, 40, 0, AddressSize::Bits48, S2Flags::default()),
        Err(TableConfigError::S2t0sz(40))
    );
    // A walk across the two concatenated level-1 tables of a 40-bit IPA space.
    let mut s = S2::new(24, 1, S2Flags::default());
    assert_eq!(s.cfg.root(), 0x1_0000);
    let hi = (1 << 39) + 3 * GB;
    s.map(hi, 7 * GB, PageSize::Size1G, S2_RW);
    // Index 512 + 3: in the second table.
    assert_eq!(s.slot(hi, 1), 0x1_0000 + (512 + 3) * 8);
    assert_eq!(
        s.walk(hi + 0x123, AccessRequest::READ).unwrap().output,
        7 * GB + 0x123
    );
    // Beyond the 40-bit IPA: a Translation fault at level 0 before any read.
    let f = s.walk(1 << 40, AccessRequest::READ).unwrap_err();
    assert_eq!(
        (f.kind, f.stage, f.level),
        (
            FaultKind::Translation,
            FaultStage::Stage2 {
                class: FaultClass::In,
                ipa: 1 << 40
            },
            0
        )
    );
}

#[test]
fn stage2_every_block_size() {
    for size in PageSize::ALL
        .into_iter()
        .filter(|s| s.granule() == Granule::Size4K)
    {
        let mut s = S2::new(16, 2, S2Flags::default());
        let ipa = 0x80_4000_0000 & !(size.bytes() - 1);
        s.map(ipa, 3 * GB, size, S2_RW);
        let mut rec = WalkRecord::default();
        let t = walk_stage2(&s.mem, &s.cfg, ipa + 8, AccessRequest::WRITE, &mut rec).unwrap();
        assert_eq!((t.output, t.page_size), (3 * GB + 8, size));
        assert_eq!(rec.steps.len(), size.level() as usize + 1);
        assert!(rec.steps.iter().all(|s| s.stage == Stage::Stage2));
    }
}

#[test]
fn stage2_permissions_and_faults() {
    let ipa = 0x4000_2000;
    let access = [
        AccessRequest::READ,
        AccessRequest::WRITE,
        AccessRequest::FETCH,
    ];
    // (S2AP and XN bits, [read, write, fetch])
    for (attrs, want) in [
        (D::S2AP_R | D::S2AP_W, [true, true, true]),
        (D::S2AP_R, [true, false, true]),
        (D::S2AP_W, [false, true, true]),
        (0, [false, false, true]),
        (D::S2AP_R | D::XN, [true, false, false]),
    ] {
        let mut s = S2::new(25, 1, S2Flags::default());
        s.map(ipa, 0x9000, PageSize::Size4K, attrs | D::AF);
        let got = access.map(|a| match s.walk(ipa, a) {
            Ok(_) => true,
            Err(f) => {
                assert_eq!(
                    (f.kind, f.stage, f.level),
                    (
                        FaultKind::Permission,
                        FaultStage::Stage2 {
                            class: FaultClass::In,
                            ipa
                        },
                        3
                    )
                );
                false
            }
        });
        assert_eq!(got, want, "attrs {attrs:#x}");
    }
    // AF = 0: Access fault unless S2AFFD or S2HA (which sets it).
    for (flags, ok, sets) in [
        (S2Flags::default(), false, false),
        (
            S2Flags {
                affd: true,
                ..S2Flags::default()
            },
            true,
            false,
        ),
        (
            S2Flags {
                ha: true,
                ..S2Flags::default()
            },
            true,
            true,
        ),
    ] {
        let mut s = S2::new(25, 1, flags);
        s.map(ipa, 0x9000, PageSize::Size4K, D::S2AP_R);
        let r = s.walk(ipa, AccessRequest::READ);
        assert_eq!(r.is_ok(), ok);
        if !ok {
            assert_eq!(r.unwrap_err().kind, FaultKind::Access);
        }
        let desc = s.mem.read_u64(s.slot(ipa, 3)).unwrap();
        assert_eq!(desc & D::AF != 0, sets);
    }
    // S2HD: a write to a DBM leaf without S2AP[1] sets it.
    let mut s = S2::new(
        25,
        1,
        S2Flags {
            ha: true,
            hd: true,
            ..S2Flags::default()
        },
    );
    s.map(ipa, 0x9000, PageSize::Size4K, D::AF | D::S2AP_R | D::DBM);
    let t = s.walk(ipa, AccessRequest::READ).unwrap();
    assert!(t.perms.write && !t.dirty);
    let mut rec = WalkRecord::default();
    let t = walk_stage2(&s.mem, &s.cfg, ipa, AccessRequest::WRITE, &mut rec).unwrap();
    assert!(t.dirty);
    assert_eq!(rec.steps.last().unwrap().set_bits, D::S2AP_W);
    assert_ne!(s.mem.read_u64(s.slot(ipa, 3)).unwrap() & D::S2AP_W, 0);
    // Address size: S2PS 32 bits.
    let mut s = S2::new(25, 1, S2Flags::default());
    s.cfg = S2Config::new(0x1_0000, 25, 1, AddressSize::Bits32, S2Flags::default()).unwrap();
    s.map(ipa, 1 << 32, PageSize::Size4K, S2_RW);
    assert_eq!(
        s.walk(ipa, AccessRequest::READ).unwrap_err().kind,
        FaultKind::AddrSize
    );
    // An external abort names the descriptor's address.
    let mut s = S2::new(25, 1, S2Flags::default());
    s.map(ipa, 0x9000, PageSize::Size4K, S2_RW);
    let slot = s.slot(ipa, 2);
    s.mem.write_u64(slot, D::table(0x4000_0000, 0).0).unwrap();
    let f = s.walk(ipa, AccessRequest::READ).unwrap_err();
    assert_eq!(
        (f.kind, f.level, f.fetch_address),
        (FaultKind::WalkEabt, 3, Some(0x4000_0000 + 2 * 8))
    );
}

// ---------------------------------------------------------------------------------------
// Nested

/// Guest stage-1 tables at IPA [1 MiB, 4 MiB), which stage 2 maps to PA + 4 MiB with two
/// 2 MiB blocks; stage-2 tables at PA [1 MiB, 4 MiB) (S2TTB at 64 KiB); all in 8 MiB.
struct Nested {
    mem: TestMemory,
    s1: S1Config,
    s2: S2Config,
    s1_tables: TableBuilder,
    s2_tables: TableBuilder,
    s1_frames: Bump,
    s2_frames: Bump,
}

const GUEST_BASE: u64 = 4 * MB;

impl Nested {
    fn new(s1: S1Config, s2: S2Config) -> Self {
        let mut n = Nested {
            mem: TestMemory::new(8 * MB),
            s1_tables: TableBuilder::stage1(&s1),
            s2_tables: TableBuilder::stage2(&s2),
            s1,
            s2,
            s1_frames: Bump {
                next: MB,
                end: 4 * MB,
            },
            s2_frames: Bump {
                next: MB,
                end: 4 * MB,
            },
        };
        n.map_s2(0, GUEST_BASE, PageSize::Size2M, S2_RW);
        n.map_s2(2 * MB, GUEST_BASE + 2 * MB, PageSize::Size2M, S2_RW);
        n
    }

    fn guest(&self) -> Offset<'_> {
        Offset {
            inner: &self.mem,
            base: GUEST_BASE,
        }
    }

    fn map_s1(
        &mut self,
        va: u64,
        ipa: u64,
        size: PageSize,
        attrs: u64,
    ) -> Result<(), crate::builder::BuildError> {
        let frames = &mut self.s1_frames;
        let guest = Offset {
            inner: &self.mem,
            base: GUEST_BASE,
        };
        self.s1_tables
            .map(&guest, &mut || frames.alloc(), va, ipa, size, attrs)
    }

    fn map_s2(&mut self, ipa: u64, pa: u64, size: PageSize, attrs: u64) {
        let frames = &mut self.s2_frames;
        self.s2_tables
            .map(&self.mem, &mut || frames.alloc(), ipa, pa, size, attrs)
            .unwrap();
    }

    fn walk(
        &self,
        va: u64,
        access: AccessRequest,
        rec: &mut WalkRecord,
    ) -> Result<Translation, WalkFault> {
        walk_nested(&self.mem, &self.s1, &self.s2, va, access, rec)
    }
}

fn nested_default() -> Nested {
    let s1 = S1Config::new(0x1000, 16, AddressSize::Bits48, S1Flags::default()).unwrap();
    let s2 = S2Config::new(0x1_0000, 24, 1, AddressSize::Bits48, S2Flags::default()).unwrap();
    Nested::new(s1, s2)
}

#[test]
fn nested_walk_translates_every_table_address() {
    let mut n = nested_default();
    n.map_s1(VA, 5 * GB + 0x3000, PageSize::Size4K, S1_RW_EL0)
        .unwrap();
    n.map_s2(5 * GB, 0x7_0000_0000, PageSize::Size2M, S2_RW);
    let mut rec = WalkRecord::default();
    let t = n.walk(VA + 0x10, AccessRequest::WRITE, &mut rec).unwrap();
    assert_eq!(t.output, 0x7_0000_3010);
    assert_eq!(t.page_size, PageSize::Size4K);
    // Each stage-1 descriptor read is preceded by the stage-2 walk of its IPA (two 2 MiB
    // block lookups: L1, L2), then the final IPA's stage-2 walk.
    let stages: Vec<(Stage, u8)> = rec.steps.iter().map(|s| (s.stage, s.level)).collect();
    let mut want = Vec::new();
    for l in 0..=3 {
        want.extend([(Stage::Stage2, 1), (Stage::Stage2, 2), (Stage::Stage1, l)]);
    }
    want.extend([(Stage::Stage2, 1), (Stage::Stage2, 2)]);
    assert_eq!(stages, want);
    // Stage-1 descriptors are read at PA = IPA + 4 MiB.
    for s in rec.steps.iter().filter(|s| s.stage == Stage::Stage1) {
        let ipa = s.table + ((VA >> (12 + 9 * (3 - s.level as u32))) & 0x1ff) * 8;
        assert_eq!(s.entry_address, ipa + GUEST_BASE);
    }
    // The stage-1 walk of the same tables seen at their IPAs gives the IPA.
    let s1 = walk_stage1(&n.guest(), &n.s1, VA + 0x10, AccessRequest::WRITE, &mut ()).unwrap();
    assert_eq!(s1.output, 5 * GB + 0x3010);
}

#[test]
fn nested_stage2_faults_on_table_and_output() {
    let mut n = nested_default();
    n.map_s1(VA, 5 * GB, PageSize::Size4K, S1_RW_EL0).unwrap();
    // The final IPA is not mapped at stage 2: F_TRANSLATION, S2, CLASS IN, IPA 5 GiB.
    let f = n
        .walk(VA + 8, AccessRequest::READ, &mut WalkRecord::default())
        .unwrap_err();
    assert_eq!(
        (f.kind, f.stage, f.input),
        (
            FaultKind::Translation,
            FaultStage::Stage2 {
                class: FaultClass::In,
                ipa: 5 * GB + 8
            },
            VA + 8
        )
    );
    n.map_s2(5 * GB, 0x7_0000_0000, PageSize::Size4K, D::AF | D::S2AP_R);
    // Stage 2 read-only: a write is an S2 Permission fault on the input.
    let f = n
        .walk(VA, AccessRequest::WRITE, &mut WalkRecord::default())
        .unwrap_err();
    assert_eq!(
        (f.kind, f.stage),
        (
            FaultKind::Permission,
            FaultStage::Stage2 {
                class: FaultClass::In,
                ipa: 5 * GB
            }
        )
    );
    let t = n
        .walk(VA, AccessRequest::READ, &mut WalkRecord::default())
        .unwrap();
    assert_eq!(
        t.perms,
        Permissions {
            read: true,
            write: false,
            execute: true
        }
    );
    // A stage-1 table whose IPA stage 2 does not map: CLASS TT, at the stage-2 level that
    // has no descriptor (level 1: nothing maps the 1 GiB around 6 GiB).
    let l2_slot = n
        .s1_tables
        .descriptor_address(&n.guest(), VA, 2)
        .unwrap()
        .unwrap();
    n.guest().write_u64(l2_slot, D::table(6 * GB, 0).0).unwrap();
    let f = n
        .walk(VA, AccessRequest::READ, &mut WalkRecord::default())
        .unwrap_err();
    let ipa = 6 * GB + ((VA >> 12) & 0x1ff) * 8;
    assert_eq!(
        (f.kind, f.stage, f.level),
        (
            FaultKind::Translation,
            FaultStage::Stage2 {
                class: FaultClass::Tt,
                ipa
            },
            1
        )
    );
}

#[test]
fn nested_stage1_updates_are_stage2_writes() {
    let s1 = S1Config::new(
        0x1000,
        16,
        AddressSize::Bits48,
        S1Flags {
            ha: true,
            ..S1Flags::default()
        },
    )
    .unwrap();
    let s2 = S2Config::new(0x1_0000, 24, 1, AddressSize::Bits48, S2Flags::default()).unwrap();
    let mut n = Nested::new(s1, s2);
    n.map_s1(VA, 5 * GB, PageSize::Size4K, D::AP_EL0).unwrap();
    n.map_s2(5 * GB, 0x7_0000_0000, PageSize::Size4K, S2_RW);
    // Make the guest's table region read-only at stage 2: the AF update is refused with a
    // stage-2 Permission fault of CLASS TT and the descriptor is unchanged.
    for ipa in [0, 2 * MB] {
        let slot = n
            .s2_tables
            .descriptor_address(&n.mem, ipa, 2)
            .unwrap()
            .unwrap();
        let d = n.mem.read_u64(slot).unwrap();
        n.mem.write_u64(slot, d & !D::S2AP_W).unwrap();
    }
    let f = n
        .walk(VA, AccessRequest::READ, &mut WalkRecord::default())
        .unwrap_err();
    assert!(matches!(
        (f.kind, f.stage),
        (
            FaultKind::Permission,
            FaultStage::Stage2 {
                class: FaultClass::Tt,
                ..
            }
        )
    ));
    let leaf = n
        .s1_tables
        .descriptor_address(&n.guest(), VA, 3)
        .unwrap()
        .unwrap();
    assert_eq!(n.guest().read_u64(leaf).unwrap() & D::AF, 0);
    // S2PTW: stage-1 tables in Device memory (MemAttr 0000) are refused even for reads.
    let mut ptw = nested_default();
    ptw.s2 = S2Config::new(
        0x1_0000,
        24,
        1,
        AddressSize::Bits48,
        S2Flags {
            ptw: true,
            ..S2Flags::default()
        },
    )
    .unwrap();
    ptw.map_s1(VA, 5 * GB, PageSize::Size4K, S1_RW_EL0).unwrap();
    ptw.map_s2(5 * GB, 0x7_0000_0000, PageSize::Size4K, S2_RW);
    assert!(ptw
        .walk(VA, AccessRequest::READ, &mut WalkRecord::default())
        .is_ok());
    let slot = ptw
        .s2_tables
        .descriptor_address(&ptw.mem, 0, 2)
        .unwrap()
        .unwrap();
    let d = ptw.mem.read_u64(slot).unwrap();
    ptw.mem.write_u64(slot, d & !D::MEM_ATTR).unwrap();
    let f = ptw
        .walk(VA, AccessRequest::READ, &mut WalkRecord::default())
        .unwrap_err();
    assert_eq!(
        (f.kind, f.stage, f.level),
        (
            FaultKind::Permission,
            FaultStage::Stage2 {
                class: FaultClass::Tt,
                ipa: 0x1000
            },
            2
        )
    );
}

#[test]
fn nested_stage2_hardware_updates_on_stage1_tables() {
    // Stage 2 with S2HA and S2HD; the guest's table region is one 2 MiB block that is
    // writable-clean (S2AP read-only, DBM) and not yet accessed.
    let s1 = S1Config::new(
        0x1000,
        25,
        AddressSize::Bits48,
        S1Flags {
            ha: true,
            ..S1Flags::default()
        },
    )
    .unwrap();
    let flags = S2Flags {
        ha: true,
        hd: true,
        ..S2Flags::default()
    };
    let s2 = S2Config::new(0x1_0000, 24, 1, AddressSize::Bits48, flags).unwrap();
    let mut n = Nested::new(s1, s2);
    let va = 0x40_2030_1000;
    n.map_s1(va, 5 * GB, PageSize::Size4K, D::AP_EL0).unwrap();
    n.map_s2(5 * GB, 0x7_0000_0000, PageSize::Size4K, S2_RW);
    let block = n
        .s2_tables
        .descriptor_address(&n.mem, 0, 2)
        .unwrap()
        .unwrap();
    let clean = D::leaf(
        GUEST_BASE,
        PageSize::Size2M,
        D::S2AP_R | D::DBM | (0xf << 2),
    )
    .0;
    n.mem.write_u64(block, clean).unwrap();
    let mut rec = WalkRecord::default();
    n.walk(va, AccessRequest::READ, &mut rec).unwrap();
    // The first stage-2 lookup of the block sets its AF (a table read needs no write);
    // the stage-1 AF update is a write through stage 2, which makes the block dirty.
    let s2_sets: Vec<u64> = rec
        .steps
        .iter()
        .filter(|s| s.stage == Stage::Stage2 && s.entry_address == block)
        .map(|s| s.set_bits)
        .filter(|&b| b != 0)
        .collect();
    assert_eq!(s2_sets, [D::AF, D::S2AP_W]);
    assert_eq!(n.mem.read_u64(block).unwrap(), clean | D::AF | D::S2AP_W);
    let leaf = n
        .s1_tables
        .descriptor_address(&n.guest(), va, 3)
        .unwrap()
        .unwrap();
    assert_ne!(n.guest().read_u64(leaf).unwrap() & D::AF, 0);
    // The stage-1 leaf step reports the AF it set, at the PA stage 2 gave.
    let s1_leaf = rec
        .steps
        .iter()
        .find(|s| s.stage == Stage::Stage1 && s.level == 3)
        .unwrap();
    assert_eq!(
        (s1_leaf.set_bits, s1_leaf.entry_address),
        (D::AF, leaf + GUEST_BASE)
    );
}

#[test]
fn nested_walk_record_explains_both_stages() {
    let s1 = S1Config::new(0x1000, 34, AddressSize::Bits48, S1Flags::default()).unwrap();
    let s2 = S2Config::new(0x1_0000, 33, 0, AddressSize::Bits48, S2Flags::default()).unwrap();
    let mut n = Nested::new(s1, s2);
    n.map_s1(0x20_3000, 0x4000_0000, PageSize::Size4K, S1_RW_EL0)
        .unwrap();
    n.map_s2(0x4000_0000, 0x8000_0000, PageSize::Size2M, S2_RW);
    let mut rec = WalkRecord::default();
    let t = n.walk(0x20_3004, AccessRequest::READ, &mut rec).unwrap();
    assert_eq!(t.output, 0x8000_0004);
    // S2T0SZ 33 with S2SL0 0: two concatenated level-2 tables at 0x1_0000 (the block at
    // IPA 0 is entry 0, the one at 1 GiB entry 512). Stage-1 tables: TTB0 0x1000 (level 2,
    // entry 1) and the page table in the first frame, 1 MiB.
    let text = rec.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        [
            "S2 L2 input 0x1008: table 0x10000 desc@0x10000 = 0x00000000004004fd -> Size2M at 0x400000",
            "S1 L2 input 0x203004: table 0x1000 desc@0x401008 = 0x0000000000100003 -> table 0x100000",
            "S2 L2 input 0x100018: table 0x10000 desc@0x10000 = 0x00000000004004fd -> Size2M at 0x400000",
            "S1 L3 input 0x203004: table 0x100000 desc@0x500018 = 0x0000000040000443 -> Size4K at 0x40000000",
            "S2 L2 input 0x40000004: table 0x10000 desc@0x11000 = 0x00000000800004fd -> Size2M at 0x80000000",
        ]
    );
}

#[test]
fn stage1_walks_from_each_start_equal_the_full_walk() {
    let mut s = S1::new(16, S1Flags::default());
    s.map(VA, 0x5000, PageSize::Size4K, S1_RW_EL0);
    let l1 = s.desc(VA, 1);
    s.set(VA, 1, l1 | D::AP_TABLE_RO | D::UXN_TABLE);
    let accesses = [
        AccessRequest::READ,
        AccessRequest::WRITE,
        AccessRequest::FETCH,
        AccessRequest::FETCH.privileged(),
    ];
    for access in accesses {
        let mut full = WalkRecord::default();
        let want = walk_stage1(&s.mem, &s.cfg, VA, access, &mut full);
        let mut start = S1Start::top(&s.cfg);
        for (i, step) in full.steps.iter().enumerate() {
            let mut rec = WalkRecord::default();
            let got = walk_stage1_from(&s.mem, &s.cfg, &mut Direct, start, VA, access, &mut rec);
            assert_eq!(got, want, "{access:?} from level {}", start.level);
            assert_eq!(rec.steps, full.steps[i..]);
            if let StepOutcome::Table(_) = step.outcome {
                start = start.below(TableFormat::FOUR_K, step.entry);
            }
        }
        // The controls came along: below level 1 writes and unprivileged fetches fail.
        assert!(start.controls.read_only && start.controls.uxn);
    }
    assert!(walk_stage1(&s.mem, &s.cfg, VA, AccessRequest::WRITE, &mut ()).is_err());
    // A start level outside the table walks from the top.
    let bad = S1Start {
        level: 7,
        ..S1Start::top(&s.cfg)
    };
    let mut rec = WalkRecord::default();
    walk_stage1_from(
        &s.mem,
        &s.cfg,
        &mut Direct,
        bad,
        VA,
        AccessRequest::READ,
        &mut rec,
    )
    .unwrap();
    assert_eq!(rec.steps.len(), 4);
}

#[test]
fn hostile_starts_fault_without_panicking() {
    let mut s = S1::new(16, S1Flags::default());
    s.map(VA, 0x5000, PageSize::Size4K, S1_RW_EL0);
    let far = S1Start {
        level: 3,
        table: u64::MAX - 7,
        controls: TableControls::default(),
    };
    let f = walk_stage1_from(
        &s.mem,
        &s.cfg,
        &mut Direct,
        far,
        VA,
        AccessRequest::READ,
        &mut (),
    )
    .unwrap_err();
    assert_eq!((f.kind, f.level), (FaultKind::WalkEabt, 3));
    assert_eq!(far.below(TableFormat::FOUR_K, 0).level, 4);
    assert_eq!(
        S1Start {
            level: u8::MAX,
            ..far
        }
        .below(TableFormat::FOUR_K, 0)
        .level,
        u8::MAX
    );
    let s2 = S2::new(25, 1, S2Flags::default());
    let far = S2Start {
        level: 3,
        table: u64::MAX - 7,
    };
    let f =
        walk_stage2_from(&s2.mem, &s2.cfg, far, 0x1000, AccessRequest::READ, &mut ()).unwrap_err();
    assert_eq!((f.kind, f.level), (FaultKind::WalkEabt, 3));
    assert_eq!(
        S2Start {
            level: u8::MAX,
            ..far
        }
        .below(TableFormat::FOUR_K, 0)
        .level,
        u8::MAX
    );
}

#[test]
fn stage2_and_nested_walks_from_lower_starts() {
    let mut s = S2::new(24, 1, S2Flags::default());
    let ipa = (1 << 39) + 0x4020_3000;
    s.map(ipa, 0x9000, PageSize::Size4K, S2_RW);
    let mut full = WalkRecord::default();
    let want = walk_stage2(&s.mem, &s.cfg, ipa + 4, AccessRequest::READ, &mut full);
    let mut start = S2Start::top(&s.cfg);
    assert_eq!(full.steps.len(), 3);
    for (i, step) in full.steps.iter().enumerate() {
        let mut rec = WalkRecord::default();
        let got = walk_stage2_from(
            &s.mem,
            &s.cfg,
            start,
            ipa + 4,
            AccessRequest::READ,
            &mut rec,
        );
        assert_eq!(got, want);
        assert_eq!(rec.steps, full.steps[i..]);
        if let StepOutcome::Table(_) = step.outcome {
            start = start.below(TableFormat::FOUR_K, step.entry);
        }
    }

    // Nested: stage 1 from each of its starts, and stage 2 of the output from each of its.
    let mut n = nested_default();
    n.map_s1(VA, 5 * GB + 0x3000, PageSize::Size4K, S1_RW_EL0)
        .unwrap();
    n.map_s2(5 * GB + 0x3000, 0x7_0000_0000, PageSize::Size4K, S2_RW);
    let mut full = WalkRecord::default();
    let want = n.walk(VA, AccessRequest::WRITE, &mut full).unwrap();
    assert_eq!(want.output, 0x7_0000_0000);
    let stage = NestedStage {
        mem: &n.mem,
        s2: &n.s2,
    };
    let mut start = S1Start::top(&n.s1);
    for step in full.steps.iter().filter(|s| s.stage == Stage::Stage1) {
        let mut nested = NestedStage { ..stage };
        let got = walk_stage1_from(
            &n.mem,
            &n.s1,
            &mut nested,
            start,
            VA,
            AccessRequest::WRITE,
            &mut (),
        );
        assert_eq!(got, Ok(want));
        if let StepOutcome::Table(_) = step.outcome {
            start = start.below(TableFormat::FOUR_K, step.entry);
        }
    }
    // The stage-2 walk of the output: the steps after the last stage-1 one (L1, L2, L3).
    let last_s1 = full
        .steps
        .iter()
        .rposition(|s| s.stage == Stage::Stage1)
        .unwrap();
    let output_steps = &full.steps[last_s1 + 1..];
    assert_eq!(output_steps.len(), 3);
    let mut s2_start = S2Start::top(&n.s2);
    for step in output_steps {
        assert_eq!(step.stage, Stage::Stage2);
        let got = stage.output_from(s2_start, 5 * GB + 0x3000, AccessRequest::WRITE, VA, &mut ());
        assert_eq!(got.map(|t| t.output), Ok(want.output));
        if let StepOutcome::Table(_) = step.outcome {
            s2_start = s2_start.below(TableFormat::FOUR_K, step.entry);
        }
    }
    // A stage-2 start for the table region reads the same stage-1 descriptor address.
    let top = stage
        .descriptor_from(S2Start::top(&n.s2), 0x1000, false, VA, &mut ())
        .unwrap();
    assert_eq!(top.output, GUEST_BASE + 0x1000);
}

#[test]
fn nested_page_size_is_the_smaller() {
    let mut n = nested_default();
    n.map_s1(VA & !(GB - 1), 5 * GB, PageSize::Size1G, S1_RW_EL0)
        .unwrap();
    n.map_s2(5 * GB, 0x7_0000_0000, PageSize::Size2M, S2_RW);
    let t = n
        .walk(
            VA & !(GB - 1),
            AccessRequest::READ,
            &mut WalkRecord::default(),
        )
        .unwrap();
    assert_eq!(t.page_size, PageSize::Size2M);
}

// ---------------------------------------------------------------------------------------
// Property: nested == stage 1 composed with stage 2

fn arb_size() -> impl Strategy<Value = PageSize> {
    prop_oneof![
        4 => Just(PageSize::Size4K),
        2 => Just(PageSize::Size2M),
        1 => Just(PageSize::Size1G),
    ]
}

fn arb_access() -> impl Strategy<Value = AccessRequest> {
    (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(write, instruction, privileged)| {
        AccessRequest {
            write,
            instruction,
            privileged,
        }
    })
}

prop_compose! {
    /// A stage-1 mapping: VA slot, IPA slot within 1 GiB at 4 GiB, size, attribute bits.
    /// The few IPA slots make stage-1 outputs meet the stage-2 mappings often.
    fn arb_s1_map()(va in 0u64..64, ipa in 0u64..4, size in arb_size(),
                    ap in prop_oneof![2 => Just(1u64), 1 => 0u64..4],
                    af in prop::bool::weighted(0.9),
                    uxn in prop::bool::weighted(0.2), pxn in prop::bool::weighted(0.2))
                    -> (u64, u64, PageSize, u64) {
        let attrs = ap << 6 | if af { D::AF } else { 0 } | if uxn { D::UXN } else { 0 }
            | if pxn { D::PXN } else { 0 };
        (va << size.shift(), 4 * GB + ((ipa << size.shift()) & (GB - 1)), size, attrs)
    }
}

prop_compose! {
    /// A stage-2 mapping of part of the IPA range at 4 GiB.
    fn arb_s2_map()(ipa in 0u64..4, size in arb_size(),
                    s2ap in prop_oneof![2 => Just(3u64), 1 => 0u64..4],
                    af in prop::bool::weighted(0.9), xn in prop::bool::weighted(0.2))
                    -> (u64, PageSize, u64) {
        let attrs = s2ap << 6 | (0xf << 2) | if af { D::AF } else { 0 } | if xn { D::XN } else { 0 };
        (4 * GB + ((ipa << size.shift()) & (GB - 1)), size, attrs)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Hardware updates of a stage-1 leaf: a successful walk leaves AF set when HA is on
    /// (and untouched otherwise), a successful write to a writable-clean page under HA+HD
    /// leaves it writable-dirty, a refused access changes nothing, and walking again
    /// changes nothing more and gives the same translation.
    #[test]
    fn stage1_hardware_updates(
        ha: bool, hd: bool, affd: bool,
        ap in 0u64..4, af: bool, dbm: bool, uxn: bool, pxn: bool,
        access in arb_access(),
    ) {
        let flags = S1Flags { ha, hd, affd, ..S1Flags::default() };
        let mut s = S1::new(25, flags);
        let attrs = ap << 6
            | if af { D::AF } else { 0 }
            | if dbm { D::DBM } else { 0 }
            | if uxn { D::UXN } else { 0 }
            | if pxn { D::PXN } else { 0 };
        s.map(VA, 0x5000, PageSize::Size4K, attrs);
        let before = s.desc(VA, 3);
        let first = s.walk(VA, access);
        let after = s.desc(VA, 3);
        match first {
            Err(_) => prop_assert_eq!(after, before, "a refused access updates nothing"),
            Ok(t) => {
                prop_assert_eq!(after & D::AF != 0, af || ha);
                let cleaned = access.write && before & D::AP_RO != 0;
                prop_assert!(!cleaned || (ha && hd && dbm), "AP[2] cleared only by HD on DBM");
                prop_assert_eq!(after & D::AP_RO == 0, before & D::AP_RO == 0 || cleaned);
                prop_assert_eq!(after & !(D::AF | D::AP_RO), before & !(D::AF | D::AP_RO));
                prop_assert_eq!(t.dirty, after & D::AP_RO == 0);
                let mut rec = WalkRecord::default();
                let again = walk_stage1(&s.mem, &s.cfg, VA, access, &mut rec);
                prop_assert_eq!(again, Ok(t));
                prop_assert!(rec.steps.iter().all(|s| s.set_bits == 0 && s.cleared_bits == 0));
                prop_assert_eq!(s.desc(VA, 3), after);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Hostile tables: memory full of random words (biased to valid table descriptors
    /// pointing back into it), random configurations and addresses. Every walk ends with a
    /// translation or a fault, never a panic, and a walk reads at most one descriptor per
    /// level of each stage.
    #[test]
    fn random_tables_never_panic(
        words in prop::collection::vec(any::<u64>(), 2048),
        table_bias in prop::collection::vec(any::<bool>(), 2048),
        t0sz in 16u8..40, s2 in prop::sample::select(vec![(16u8, 2u8), (24, 1), (33, 0), (39, 0)]),
        ha: bool, hd: bool, affd: bool,
        vas in prop::collection::vec(any::<u64>(), 8),
        access in arb_access(),
    ) {
        let mem = TestMemory::new(16 * 1024);
        for (i, (&w, &t)) in words.iter().zip(&table_bias).enumerate() {
            // Half the words are table/page descriptors into the 16 KiB.
            let w = if t { (w & 0x3000) | (w & !D::ADDR_MASK) | 3 } else { w };
            mem.write_u64(i as u64 * 8, w).unwrap();
        }
        let s1 = S1Config::new(0, t0sz, AddressSize::Bits48, S1Flags { ha, hd, affd, ..S1Flags::default() }).unwrap();
        let s2 = S2Config::new(0, s2.0, s2.1, AddressSize::Bits48, S2Flags { ha, hd, affd, ..S2Flags::default() }).unwrap();
        for &va in &vas {
            // Mostly inside the VA range, so the tables are read.
            let va = if va & 1 == 0 { va & ((1 << s1.input_bits()) - 1) } else { va };
            let mut rec = WalkRecord::default();
            let _ = walk_nested(&mem, &s1, &s2, va, access, &mut rec);
            let s1_steps = rec.steps.iter().filter(|s| s.stage == Stage::Stage1).count();
            prop_assert!(s1_steps <= 4);
            // One stage-2 walk per stage-1 descriptor read, update and the output.
            prop_assert!(rec.steps.len() <= s1_steps + 4 * (2 * s1_steps + 1));
            let _ = walk_stage1(&mem, &s1, va, access, &mut ());
            let _ = walk_stage2(&mem, &s2, va, access, &mut ());
        }
    }
}

/// How the probes of the nested property ended.
#[derive(Default)]
struct Outcomes {
    translated: std::cell::Cell<u32>,
    stage1_faults: std::cell::Cell<u32>,
    stage2_faults: std::cell::Cell<u32>,
}

#[test]
fn nested_equals_stage1_then_stage2() {
    use proptest::test_runner::{Config, TestRunner};
    let strategy = (
        prop::sample::select(vec![16u8, 25, 34]),
        prop::sample::select(vec![(16u8, 2u8), (24, 1), (31, 0)]),
        prop::collection::vec(arb_s1_map(), 1..12),
        prop::collection::vec(arb_s2_map(), 1..12),
        // Mostly addresses inside a stage-1 mapping; the rest anywhere.
        prop::collection::vec(
            (
                prop::option::weighted(0.9, 0usize..12),
                0u64..(1 << 30),
                arb_access(),
            ),
            1..16,
        ),
    );
    let seen = Outcomes::default();
    let bump = |c: &std::cell::Cell<u32>| c.set(c.get() + 1);
    let mut runner = TestRunner::new(Config {
        failure_persistence: None,
        ..Config::with_cases(128)
    });
    runner
        .run(&strategy, |(t0sz, s2cfg, s1_maps, s2_maps, probes)| {
            let s1 = S1Config::new(0x1000, t0sz, AddressSize::Bits48, S1Flags::default()).unwrap();
            let s2 = S2Config::new(
                0x1_0000,
                s2cfg.0,
                s2cfg.1,
                AddressSize::Bits48,
                S2Flags::default(),
            )
            .unwrap();
            let mut n = Nested::new(s1, s2);
            let mut vas = Vec::new();
            for &(va, ipa, size, attrs) in &s1_maps {
                let va = va & ((1 << s1.input_bits()) - 1);
                // Conflicting and too-large mappings are simply skipped.
                if n.map_s1(va, ipa, size, attrs).is_ok() {
                    vas.push((va, size));
                }
            }
            for &(ipa, size, attrs) in &s2_maps {
                if ipa >> s2.input_bits() == 0 {
                    let frames = &mut n.s2_frames;
                    let pa = 0x10_0000_0000 + ipa;
                    let _ = n
                        .s2_tables
                        .map(&n.mem, &mut || frames.alloc(), ipa, pa, size, attrs);
                }
            }
            for &(i, off, access) in &probes {
                let mapped = i.and_then(|i| vas.get(i % vas.len().max(1)));
                let va = match mapped {
                    Some(&(va, size)) => va + (off & (size.bytes() - 1)),
                    None => off,
                };
                let nested = n.walk(va, access, &mut WalkRecord::default());
                let first = walk_stage1(&n.guest(), &n.s1, va, access, &mut ());
                let expected = first.and_then(|t1| {
                    walk_stage2(&n.mem, &n.s2, t1.output, access, &mut ())
                        .map(|t2| Translation {
                            output: t2.output,
                            page_size: t1.page_size.min(t2.page_size),
                            perms: t1.perms.intersect(t2.perms),
                            dirty: t1.dirty && t2.dirty,
                            global: t1.global,
                        })
                        .map_err(|f| WalkFault { input: va, ..f })
                });
                prop_assert_eq!(nested, expected, "va {:#x} {:?}", va, access);
                match nested {
                    Ok(_) => bump(&seen.translated),
                    Err(WalkFault {
                        stage: FaultStage::Stage1,
                        ..
                    }) => bump(&seen.stage1_faults),
                    Err(_) => bump(&seen.stage2_faults),
                }
            }
            Ok(())
        })
        .unwrap();
    let (ok, s1f, s2f) = (
        seen.translated.get(),
        seen.stage1_faults.get(),
        seen.stage2_faults.get(),
    );
    println!("nested property: {ok} translated, {s1f} stage-1 faults, {s2f} stage-2 faults");
    let total = ok + s1f + s2f;
    // Each outcome must be well represented, or the comparison proves little.
    for (what, n) in [
        ("translations", ok),
        ("stage-1 faults", s1f),
        ("stage-2 faults", s2f),
    ] {
        assert!(n * 10 >= total, "only {n} of {total} probes were {what}");
    }
}
