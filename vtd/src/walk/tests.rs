use super::*;
use crate::builder::{MapFlags, PageTableBuilder, TableFormat};
use crate::fault::FaultReason::{self, *};
use crate::flpte::{FlFormat, FlPagingMode, FlPte};
use crate::slpte::{SlFormat, SlLevels, SlPte};
use crate::testutil::{TestFrames, TestMemory};
use proptest::prelude::*;
use std::cell::Cell;
use vsva_mem::{MemError, PhysMem};

const MB: u64 = 1 << 20;
const R: MapFlags = MapFlags::READ;
const W: MapFlags = MapFlags::WRITE;
const X: MapFlags = MapFlags::EXECUTE;
const U: MapFlags = MapFlags::USER;

/// A memory seen at an offset: guest physical address `a` is `base + a` of `inner`.
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

/// A table in test memory, with its frames at [12 MiB, 16 MiB), and the configuration a
/// walker reads it with.
struct Setup<C> {
    mem: TestMemory,
    frames: TestFrames,
    table: PageTableBuilder,
    cfg: C,
}

impl<C> Setup<C> {
    /// An empty table of `format`, walked with `cfg(root)`.
    fn with(format: TableFormat, cfg: impl FnOnce(u64) -> C) -> Self {
        let mem = TestMemory::new(16 * MB);
        let mut frames = TestFrames::new(12 * MB, 16 * MB);
        let table = PageTableBuilder::new(format, &mem, &mut frames).unwrap();
        let cfg = cfg(table.root());
        Setup {
            mem,
            frames,
            table,
            cfg,
        }
    }

    fn map(&mut self, va: u64, pa: u64, size: PageSize, flags: MapFlags) {
        self.table
            .map(&self.mem, &mut self.frames, va, pa, size, flags)
            .unwrap();
    }

    fn entry(&self, va: u64, level: u8) -> u64 {
        let slot = self
            .table
            .entry_address(&self.mem, va, level)
            .unwrap()
            .unwrap();
        self.mem.read_u64(slot).unwrap()
    }

    fn set_entry(&mut self, va: u64, level: u8, value: u64) {
        self.table.write_entry(&self.mem, va, level, value).unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// First level

type FlSetup = Setup<FlConfig>;

impl FlSetup {
    fn new(mode: FlPagingMode) -> Self {
        Setup::with(TableFormat::FirstLevel(mode), |root| FlConfig {
            root,
            mode,
            sre: true,
            wpe: true,
            eafe: false,
            format: FlFormat::new(46, true).unwrap(),
        })
    }

    fn walk(&self, va: u64, access: AccessRequest) -> Result<Translation, WalkFault> {
        walk_first_level(&self.mem, &self.cfg, va, access, &mut ())
    }

    fn record(
        &self,
        va: u64,
        access: AccessRequest,
    ) -> (Result<Translation, WalkFault>, WalkRecord) {
        let mut rec = WalkRecord::default();
        let r = walk_first_level(&self.mem, &self.cfg, va, access, &mut rec);
        (r, rec)
    }
}

fn reason(r: Result<Translation, WalkFault>) -> FaultReason {
    r.unwrap_err().reason
}

const VA: u64 = 0x7f80_4000_0000;

#[test]
fn first_level_every_page_size_and_mode() {
    for mode in [FlPagingMode::FourLevel, FlPagingMode::FiveLevel] {
        for size in PageSize::ALL {
            let mut s = FlSetup::new(mode);
            let pa = 3 << 30;
            s.map(VA, pa, size, R | W | X | U);
            let off = size.bytes() - 8;
            let (t, rec) = s.record(VA + off, AccessRequest::READ);
            let t = t.unwrap();
            assert_eq!(t.output, pa + off);
            assert_eq!(t.page_base(), pa);
            assert_eq!(t.page_size, size);
            assert_eq!(t.perms, Permissions::ALL);
            assert!(!t.dirty);
            let walked = mode.levels() - size.level() + 1;
            assert_eq!(rec.steps.len(), walked as usize, "{mode:?} {size:?}");
            for (i, step) in rec.steps.iter().enumerate() {
                assert_eq!(step.level, mode.levels() - i as u8);
                assert_eq!(step.set_bits, FlPte::A);
                assert_eq!(step.stage, Stage::FirstLevel);
            }
            assert_eq!(
                rec.steps.last().unwrap().outcome,
                StepOutcome::Page { base: pa, size }
            );
            assert_eq!(rec.steps[0].table, s.cfg.root);

            // A write sets D in the leaf only; A is already set everywhere.
            let (t, rec) = s.record(VA, AccessRequest::WRITE);
            assert!(t.unwrap().dirty);
            let sets: Vec<u64> = rec.steps.iter().map(|s| s.set_bits).collect();
            let mut want = vec![0; walked as usize - 1];
            want.push(FlPte::D);
            assert_eq!(sets, want);
            assert!(FlPte(s.entry(VA, size.level())).dirty());
            for level in size.level() + 1..=mode.levels() {
                assert!(
                    !FlPte(s.entry(VA, level)).dirty(),
                    "no D in non-leaf entries"
                );
            }
            // Nothing left to update.
            let (_, rec) = s.record(VA, AccessRequest::WRITE);
            assert!(rec.steps.iter().all(|s| s.set_bits == 0));
        }
    }
}

#[test]
fn first_level_not_present_at_each_level() {
    for level in 1..=4 {
        let mut s = FlSetup::new(FlPagingMode::FourLevel);
        s.map(VA, 0x5000, PageSize::Size4K, R | U);
        s.set_entry(VA, level, FlPte::RW | FlPte::US | 0x5000);
        let (r, rec) = s.record(VA, AccessRequest::READ);
        let f = r.unwrap_err();
        assert_eq!(
            (f.reason, f.stage, f.level, f.input),
            (Sfl2, Stage::FirstLevel, level, VA)
        );
        assert_eq!(rec.steps.last().unwrap().outcome, StepOutcome::Fault(Sfl2));
        assert_eq!(rec.steps.len(), (5 - level) as usize);
    }
}

#[test]
fn first_level_reserved_bits() {
    // (page size, level to modify, bits to add, expected)
    let cases: [(PageSize, u8, u64, Option<FaultReason>); 9] = [
        (PageSize::Size4K, 1, 1 << 46, Some(Sfl3)),
        (PageSize::Size4K, 1, 1 << 51, Some(Sfl3)),
        (PageSize::Size4K, 4, FlPte::PS, Some(Sfl3)),
        (PageSize::Size4K, 3, 1 << 47, Some(Sfl3)),
        (PageSize::Size2M, 2, 1 << 13, Some(Sfl3)),
        (PageSize::Size1G, 3, 1 << 20, Some(Sfl3)),
        // Ignored bits, XD in a table entry and PAT of a large page are fine.
        (
            PageSize::Size4K,
            1,
            0x7ff << 52 | FlPte::G | 1 << 9 | 1 << 11,
            None,
        ),
        (PageSize::Size4K, 2, FlPte::XD, None),
        (PageSize::Size2M, 2, FlPte::PAT_LARGE, None),
    ];
    for (size, level, add, want) in cases {
        let mut s = FlSetup::new(FlPagingMode::FourLevel);
        s.map(VA, 1 << 30, size, R | X | U);
        let e = s.entry(VA, level);
        s.set_entry(VA, level, e | add);
        let r = s.walk(VA, AccessRequest::READ);
        assert_eq!(
            r.err().map(|f| (f.reason, f.level)),
            want.map(|w| (w, level)),
            "{size:?} L{level} +{add:#x}"
        );
    }
    // Without FL1GP a 1-GiB page is a reserved-bit fault.
    let mut s = FlSetup::new(FlPagingMode::FourLevel);
    s.cfg.format = FlFormat::new(46, false).unwrap();
    s.map(VA, 1 << 30, PageSize::Size1G, R | U);
    assert_eq!(reason(s.walk(VA, AccessRequest::READ)), Sfl3);
}

#[test]
fn page_requests_may_resolve_first_level_not_present_and_permission_faults() {
    let mut s = FlSetup::new(FlPagingMode::FourLevel);
    s.map(VA, 1 << 30, PageSize::Size4K, R | U);
    let resolvable = |r: Result<Translation, WalkFault>| {
        let f = r.unwrap_err();
        (f.reason, f.page_request_may_resolve())
    };
    // Not present, then a write to a read-only page, then a user read of a supervisor page.
    assert_eq!(
        resolvable(s.walk(VA + 0x1000, AccessRequest::READ)),
        (Sfl2, true)
    );
    assert_eq!(resolvable(s.walk(VA, AccessRequest::WRITE)), (Sgn6, true));
    s.map(VA + 0x1000, 1 << 30, PageSize::Size4K, R);
    assert_eq!(
        resolvable(s.walk(VA + 0x1000, AccessRequest::READ)),
        (Sgn2, true)
    );
    // A reserved bit is a programming error, not a missing page.
    let e = s.entry(VA, 1);
    s.set_entry(VA, 1, e | 1 << 46);
    assert_eq!(resolvable(s.walk(VA, AccessRequest::READ)), (Sfl3, false));
    // Second-level faults are the host's, not the process's.
    let sl = SlSetup::new(SlLevels::Four);
    assert_eq!(
        resolvable(sl.walk(IOVA, AccessRequest::READ)),
        (Ssl2, false)
    );
}

#[test]
fn first_level_rights() {
    let sup = AccessRequest::READ.supervisor();
    let sup_w = AccessRequest::WRITE.supervisor();
    let sup_x = AccessRequest::EXECUTE.supervisor();
    // (flags, access, wpe, expected)
    let cases: [(MapFlags, AccessRequest, bool, Option<FaultReason>); 13] = [
        (R, AccessRequest::READ, true, Some(Sgn2)),
        (R, sup, true, None),
        (R | U, sup, true, None),
        (R | U, AccessRequest::WRITE, true, Some(Sgn6)),
        (R | U, AccessRequest::WRITE, false, Some(Sgn6)),
        (R | W | U, AccessRequest::WRITE, true, None),
        (R, sup_w, true, Some(Sgn6)),
        (R, sup_w, false, None),
        (R | U, AccessRequest::EXECUTE, true, Some(Sgn3)),
        (R | U | X, AccessRequest::EXECUTE, true, None),
        (R | U | X, sup_x, true, Some(Sgn3)),
        (R | X, sup_x, true, None),
        (R | X, AccessRequest::EXECUTE, true, Some(Sgn2)),
    ];
    for (flags, access, wpe, want) in cases {
        let mut s = FlSetup::new(FlPagingMode::FourLevel);
        s.cfg.wpe = wpe;
        s.map(VA, 0x5000, PageSize::Size4K, flags);
        let r = s.walk(VA, access);
        assert_eq!(
            r.err().map(|f| (f.reason, f.level)),
            want.map(|w| (w, 1)),
            "{flags:?} {access:?} wpe={wpe}"
        );
        if want.is_none() {
            let p = r.unwrap().perms;
            assert_eq!(p.user, flags.contains(U));
            assert!(p.read);
        }
    }
}

#[test]
fn first_level_rights_accumulate_over_levels() {
    let mut s = FlSetup::new(FlPagingMode::FourLevel);
    s.map(VA, 0x5000, PageSize::Size4K, R | W | X | U);
    // U/S clear in the PML4E: the page is a supervisor page.
    let e = s.entry(VA, 4);
    s.set_entry(VA, 4, e & !FlPte::US);
    assert_eq!(reason(s.walk(VA, AccessRequest::READ)), Sgn2);
    let t = s.walk(VA, AccessRequest::READ.supervisor()).unwrap();
    assert!(!t.perms.user && t.perms.execute);
    // R/W clear in the PDE: read-only.
    let e = s.entry(VA, 2);
    s.set_entry(VA, 2, e & !FlPte::RW);
    assert_eq!(reason(s.walk(VA, AccessRequest::WRITE.supervisor())), Sgn6);
    // XD in the PDPE: not executable.
    let e = s.entry(VA, 3);
    s.set_entry(VA, 3, e | FlPte::XD);
    assert_eq!(
        reason(s.walk(VA, AccessRequest::EXECUTE.supervisor())),
        Sgn3
    );
    let t = s.walk(VA, AccessRequest::READ.supervisor()).unwrap();
    assert!(!t.perms.write && !t.perms.execute);
}

#[test]
fn first_level_request_checks_before_the_walk() {
    let mut s = FlSetup::new(FlPagingMode::FourLevel);
    s.map(VA, 0x5000, PageSize::Size4K, R | U);
    let (r, rec) = s.record(0x0000_8000_0000_0000, AccessRequest::READ);
    assert_eq!(r.unwrap_err().reason, Sgn1);
    assert!(rec.steps.is_empty());
    s.cfg.sre = false;
    let f = s.walk(VA, AccessRequest::READ.supervisor()).unwrap_err();
    assert_eq!((f.reason, f.level), (Spt6, 0));
    assert!(s.walk(VA, AccessRequest::READ).is_ok());
    // Canonical upper half in 4- and 5-level modes.
    let mut s = FlSetup::new(FlPagingMode::FiveLevel);
    let high = 0xff00_0000_0000_0000;
    s.map(high, 0x5000, PageSize::Size4K, R | U);
    assert_eq!(
        s.walk(high + 8, AccessRequest::READ).unwrap().output,
        0x5008
    );
    assert_eq!(
        reason(s.walk(0x0100_0000_0000_0000, AccessRequest::READ)),
        Sgn1
    );
}

#[test]
fn first_level_unreadable_tables() {
    let mut s = FlSetup::new(FlPagingMode::FourLevel);
    s.map(VA, 0x5000, PageSize::Size4K, R | U);
    let e = s.entry(VA, 2);
    s.set_entry(VA, 2, (e & !FlPte::ADDR_MASK) | 1 << 40);
    let f = s.walk(VA, AccessRequest::READ).unwrap_err();
    assert_eq!((f.reason, f.level), (Sfl1, 1));
    for root in [1 << 40, u64::MAX] {
        s.cfg.root = root;
        let (r, rec) = s.record(VA, AccessRequest::READ);
        assert_eq!(r.unwrap_err().reason, Sfl4);
        assert_eq!(rec.steps[0].outcome, StepOutcome::Fault(Sfl4));
    }
}

#[test]
fn refused_leaf_is_not_marked_accessed() {
    let mut s = FlSetup::new(FlPagingMode::FourLevel);
    s.map(VA, 0x5000, PageSize::Size4K, R | U);
    assert_eq!(reason(s.walk(VA, AccessRequest::WRITE)), Sgn6);
    assert!(!FlPte(s.entry(VA, 1)).accessed());
    assert!(FlPte(s.entry(VA, 2)).accessed());
}

#[test]
fn extended_accessed_flag() {
    let mut s = FlSetup::new(FlPagingMode::FourLevel);
    s.cfg.eafe = true;
    s.map(VA, 0x5000, PageSize::Size4K, R | U);
    let (_, rec) = s.record(VA, AccessRequest::READ);
    assert!(rec
        .steps
        .iter()
        .all(|st| st.set_bits == FlPte::A | FlPte::EA));
    for level in 1..=4 {
        assert_ne!(s.entry(VA, level) & FlPte::EA, 0);
    }
}

/// Memory where another agent rewrites one entry just before the walker's first
/// compare-exchange on it.
struct Racing<'a> {
    inner: &'a TestMemory,
    target: u64,
    replacement: u64,
    fired: Cell<bool>,
}

impl PhysMem for Racing<'_> {
    fn read_u64(&self, addr: u64) -> Result<u64, MemError> {
        self.inner.read_u64(addr)
    }
    fn fetch_or_u64(&self, addr: u64, bits: u64) -> Result<u64, MemError> {
        self.inner.fetch_or_u64(addr, bits)
    }
    fn compare_exchange_u64(&self, addr: u64, old: u64, new: u64) -> Result<u64, MemError> {
        if addr == self.target && !self.fired.replace(true) {
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
fn accessed_update_rechecks_a_changed_entry() {
    let mut s = FlSetup::new(FlPagingMode::FourLevel);
    s.map(VA, 0x5000, PageSize::Size4K, R | W | U);
    let slot = s.table.entry_address(&s.mem, VA, 1).unwrap().unwrap();
    // The PTE becomes read-only while the walker wants to set A and D on it.
    let old = s.mem.read_u64(slot).unwrap();
    let racing = Racing {
        inner: &s.mem,
        target: slot,
        replacement: old & !FlPte::RW,
        fired: Cell::new(false),
    };
    let r = walk_first_level(&racing, &s.cfg, VA, AccessRequest::WRITE, &mut ());
    assert_eq!(r.unwrap_err().reason, Sgn6);
    assert_eq!(s.mem.read_u64(slot).unwrap(), old & !FlPte::RW);
    // Not present any more: the walk sees it and sets nothing.
    let racing = Racing {
        inner: &s.mem,
        target: slot,
        replacement: 0,
        fired: Cell::new(false),
    };
    let r = walk_first_level(&racing, &s.cfg, VA, AccessRequest::READ, &mut ());
    assert_eq!(r.unwrap_err().reason, Sfl2);
    assert_eq!(s.mem.read_u64(slot).unwrap(), 0);
}

// ---------------------------------------------------------------------------------------
// Second level

type SlSetup = Setup<SlConfig>;

impl SlSetup {
    fn new(levels: SlLevels) -> Self {
        Setup::with(TableFormat::SecondLevel(levels), |root| SlConfig {
            root,
            levels,
            slee: false,
            slade: true,
            format: SlFormat::new(46).unwrap(),
        })
    }

    fn walk(&self, va: u64, access: AccessRequest) -> Result<Translation, WalkFault> {
        walk_second_level(&self.mem, &self.cfg, va, access, &mut ())
    }
}

const IOVA: u64 = 0x40_4000_0000;

#[test]
fn second_level_every_page_size_and_depth() {
    for levels in [SlLevels::Three, SlLevels::Four, SlLevels::Five] {
        for size in PageSize::ALL {
            for slade in [false, true] {
                let mut s = SlSetup::new(levels);
                s.cfg.slade = slade;
                let pa = 5 << 30;
                s.map(IOVA, pa, size, R | W);
                let mut rec = WalkRecord::default();
                let off = size.bytes() / 2 + 0x18;
                let t =
                    walk_second_level(&s.mem, &s.cfg, IOVA + off, AccessRequest::READ, &mut rec)
                        .unwrap();
                assert_eq!((t.output, t.page_size), (pa + off, size));
                assert_eq!(t.dirty, !slade);
                assert_eq!(
                    rec.steps.len(),
                    (levels.levels() - size.level() + 1) as usize
                );
                let a = if slade { SlPte::A } else { 0 };
                assert!(rec
                    .steps
                    .iter()
                    .all(|st| st.set_bits == a && st.stage == Stage::SecondLevel));
                let t = s.walk(IOVA, AccessRequest::WRITE).unwrap();
                assert!(t.dirty);
                assert_eq!(SlPte(s.entry(IOVA, size.level())).dirty(), slade);
                assert_eq!(SlPte(s.entry(IOVA, size.level())).accessed(), slade);
                for level in size.level() + 1..=levels.levels() {
                    assert!(
                        !SlPte(s.entry(IOVA, level)).dirty(),
                        "no D in non-leaf entries"
                    );
                }
            }
        }
    }
}

#[test]
fn second_level_faults() {
    let mut s = SlSetup::new(SlLevels::Four);
    s.map(IOVA, 0x5000, PageSize::Size4K, R);
    s.map(IOVA + 0x1000, 0x6000, PageSize::Size4K, W);
    s.map(IOVA + 0x2000, 0x7000, PageSize::Size4K, R | X);
    let f = |r: Result<Translation, WalkFault>| r.map(|_| ()).map_err(|f| (f.reason, f.level));
    assert_eq!(
        f(s.walk(IOVA + 0x3000, AccessRequest::READ)),
        Err((Ssl2, 1))
    );
    assert_eq!(
        f(s.walk(IOVA + (1 << 30), AccessRequest::READ)),
        Err((Ssl2, 3))
    );
    assert_eq!(f(s.walk(1 << 48, AccessRequest::READ)), Err((Sgn4, 0)));
    assert_eq!(f(s.walk(IOVA, AccessRequest::WRITE)), Err((Sgn6, 1)));
    assert_eq!(
        f(s.walk(IOVA + 0x1000, AccessRequest::READ)),
        Err((Sgn7, 1))
    );
    assert_eq!(f(s.walk(IOVA + 0x1000, AccessRequest::WRITE)), Ok(()));
    // Without SLEE an execute request is a read.
    assert_eq!(f(s.walk(IOVA, AccessRequest::EXECUTE)), Ok(()));
    assert_eq!(
        f(s.walk(IOVA + 0x1000, AccessRequest::EXECUTE)),
        Err((Sgn7, 1))
    );
    s.cfg.slee = true;
    assert_eq!(f(s.walk(IOVA, AccessRequest::EXECUTE)), Err((Sgn3, 1)));
    assert_eq!(f(s.walk(IOVA + 0x2000, AccessRequest::EXECUTE)), Ok(()));
    let t = s.walk(IOVA + 0x2000, AccessRequest::READ).unwrap();
    assert_eq!(
        t.perms,
        Permissions {
            read: true,
            write: false,
            execute: true,
            user: true
        }
    );
    // Rights are the AND over the levels.
    let e = s.entry(IOVA, 3);
    s.set_entry(IOVA, 3, e & !SlPte::X);
    assert_eq!(
        f(s.walk(IOVA + 0x2000, AccessRequest::EXECUTE)),
        Err((Sgn3, 1))
    );
    s.set_entry(IOVA, 3, e & !SlPte::W);
    assert_eq!(
        f(s.walk(IOVA + 0x1000, AccessRequest::WRITE)),
        Err((Sgn6, 1))
    );
    // Reserved bits: SNP in a non-leaf entry, an address above the width in a leaf.
    s.set_entry(IOVA, 3, e | SlPte::SNP);
    assert_eq!(f(s.walk(IOVA, AccessRequest::READ)), Err((Ssl3, 3)));
    s.set_entry(IOVA, 3, e);
    let leaf = s.entry(IOVA, 1);
    s.set_entry(IOVA, 1, leaf | 1 << 47);
    assert_eq!(f(s.walk(IOVA, AccessRequest::READ)), Err((Ssl3, 1)));
    s.cfg.format = s.cfg.format.with_snoop_control(false);
    s.set_entry(IOVA, 1, leaf | SlPte::SNP);
    assert_eq!(f(s.walk(IOVA, AccessRequest::READ)), Err((Ssl3, 1)));
    // A table beyond memory, and a bad root pointer.
    s.set_entry(IOVA, 2, (1 << 40) | SlPte::R | SlPte::W);
    assert_eq!(f(s.walk(IOVA, AccessRequest::READ)), Err((Ssl1, 1)));
    s.cfg.root |= 0x800;
    assert_eq!(f(s.walk(IOVA, AccessRequest::READ)), Err((Ssl4, 4)));
}

#[test]
fn second_level_leaf_update_waits_for_the_rights_check() {
    let mut s = SlSetup::new(SlLevels::Three);
    s.map(IOVA & ((1 << 39) - 1), 0x5000, PageSize::Size4K, R);
    let iova = IOVA & ((1 << 39) - 1);
    assert_eq!(reason(s.walk(iova, AccessRequest::WRITE)), Sgn6);
    assert!(!SlPte(s.entry(iova, 1)).accessed());
    assert!(SlPte(s.entry(iova, 2)).accessed());
}

// ---------------------------------------------------------------------------------------
// Nested

/// Guest RAM: guest physical [0, 4 MiB) is host physical [4 MiB, 8 MiB), mapped by a
/// 3-level second-level table whose frames are at [12 MiB, 16 MiB). The guest's first-level
/// tables take guest frames from [0, 1 MiB).
const GUEST_BASE: u64 = 4 * MB;

struct Nested {
    mem: TestMemory,
    sl_frames: TestFrames,
    sl: PageTableBuilder,
    sl_cfg: SlConfig,
    fl_frames: TestFrames,
    fl: PageTableBuilder,
    fl_cfg: FlConfig,
}

impl Nested {
    fn new() -> Self {
        let mem = TestMemory::new(16 * MB);
        let mut sl_frames = TestFrames::new(12 * MB, 16 * MB);
        let mut fl_frames = TestFrames::new(0x1000, MB);
        let sl = PageTableBuilder::new(
            TableFormat::SecondLevel(SlLevels::Three),
            &mem,
            &mut sl_frames,
        )
        .unwrap();
        let guest = Offset {
            inner: &mem,
            base: GUEST_BASE,
        };
        let fl = PageTableBuilder::new(
            TableFormat::FirstLevel(FlPagingMode::FourLevel),
            &guest,
            &mut fl_frames,
        )
        .unwrap();
        let sl_cfg = SlConfig {
            root: sl.root(),
            levels: SlLevels::Three,
            slee: false,
            slade: true,
            format: SlFormat::new(46).unwrap(),
        };
        let fl_cfg = FlConfig {
            root: fl.root(),
            mode: FlPagingMode::FourLevel,
            sre: true,
            wpe: true,
            eafe: false,
            format: FlFormat::new(46, true).unwrap(),
        };
        Nested {
            mem,
            sl_frames,
            sl,
            sl_cfg,
            fl_frames,
            fl,
            fl_cfg,
        }
    }

    /// Maps all guest RAM read-write in 4-KiB pages.
    fn map_guest_ram(&mut self) {
        for gpa in (0..4 * MB).step_by(4096) {
            self.sl_map(gpa, PageSize::Size4K, R | W);
        }
    }

    fn sl_map(&mut self, gpa: u64, size: PageSize, flags: MapFlags) {
        self.sl
            .map(
                &self.mem,
                &mut self.sl_frames,
                gpa,
                GUEST_BASE + gpa,
                size,
                flags,
            )
            .unwrap();
    }

    fn fl_map(&mut self, gva: u64, gpa: u64, size: PageSize, flags: MapFlags) {
        let guest = Offset {
            inner: &self.mem,
            base: GUEST_BASE,
        };
        self.fl
            .map(&guest, &mut self.fl_frames, gva, gpa, size, flags)
            .unwrap();
    }

    /// The guest physical address of the first-level table read at `level` for `gva`.
    fn fl_table(&self, gva: u64, level: u8) -> u64 {
        let guest = Offset {
            inner: &self.mem,
            base: GUEST_BASE,
        };
        self.fl.entry_address(&guest, gva, level).unwrap().unwrap() & !0xfff
    }

    fn protect_guest_page(&mut self, gpa: u64, flags: MapFlags) {
        self.sl
            .protect(&self.mem, gpa, PageSize::Size4K, flags)
            .unwrap();
    }

    fn walk(&self, gva: u64, access: AccessRequest) -> Result<Translation, WalkFault> {
        walk_nested(&self.mem, &self.fl_cfg, &self.sl_cfg, gva, access, &mut ())
    }
}

#[test]
fn nested_walk_translates_every_table_pointer() {
    let mut n = Nested::new();
    n.map_guest_ram();
    n.fl_map(VA, 0x20_3000, PageSize::Size4K, R | W | U);
    let mut rec = WalkRecord::default();
    let t = walk_nested(
        &n.mem,
        &n.fl_cfg,
        &n.sl_cfg,
        VA + 0x10,
        AccessRequest::WRITE,
        &mut rec,
    )
    .unwrap();
    assert_eq!(t.output, GUEST_BASE + 0x20_3010);
    assert_eq!(t.page_size, PageSize::Size4K);
    assert!(t.dirty);
    // Per first-level entry: a second-level read walk (3 steps), a second-level write walk
    // for the accessed/dirty update (3 steps), then the first-level step; finally the
    // second-level walk of the output.
    let stages: Vec<(Stage, u8)> = rec.steps.iter().map(|s| (s.stage, s.level)).collect();
    let mut want = Vec::new();
    for level in (1..=4).rev() {
        for _ in 0..2 {
            want.extend([
                (Stage::SecondLevel, 3),
                (Stage::SecondLevel, 2),
                (Stage::SecondLevel, 1),
            ]);
        }
        want.push((Stage::FirstLevel, level));
    }
    want.extend([
        (Stage::SecondLevel, 3),
        (Stage::SecondLevel, 2),
        (Stage::SecondLevel, 1),
    ]);
    assert_eq!(stages, want);
    assert_eq!(rec.steps[0].input, n.fl_cfg.root);
    assert_eq!(rec.steps.last().unwrap().input, 0x20_3010);
    // The first-level steps read host physical addresses.
    let fl_step = rec
        .steps
        .iter()
        .find(|s| s.stage == Stage::FirstLevel)
        .unwrap();
    assert_eq!(fl_step.table, n.fl_cfg.root);
    assert_eq!(fl_step.entry_address & !0xfff, GUEST_BASE + n.fl_cfg.root);
    // A second walk only reads: one second-level read walk per level.
    let mut rec = WalkRecord::default();
    walk_nested(
        &n.mem,
        &n.fl_cfg,
        &n.sl_cfg,
        VA,
        AccessRequest::WRITE,
        &mut rec,
    )
    .unwrap();
    assert_eq!(rec.steps.len(), 4 * 4 + 3);
    assert!(rec.steps.iter().all(|s| s.set_bits == 0));
}

#[test]
fn nested_page_size_is_the_smaller() {
    let cases = [
        (PageSize::Size2M, PageSize::Size4K, PageSize::Size4K),
        (PageSize::Size4K, PageSize::Size2M, PageSize::Size4K),
        (PageSize::Size2M, PageSize::Size2M, PageSize::Size2M),
    ];
    for (fl_size, sl_size, want) in cases {
        let mut n = Nested::new();
        match sl_size {
            PageSize::Size2M => {
                n.sl_map(0, PageSize::Size2M, R | W);
                n.sl_map(2 * MB, PageSize::Size2M, R | W);
            }
            _ => n.map_guest_ram(),
        }
        n.fl_map(VA, 2 * MB, fl_size, R | U);
        let t = n.walk(VA + 0x234, AccessRequest::READ).unwrap();
        assert_eq!(t.page_size, want);
        assert_eq!(t.output, GUEST_BASE + 2 * MB + 0x234);
    }
}

#[test]
fn nested_second_level_checks_on_first_level_tables() {
    let gpa = 0x20_3000;
    let setup = || {
        let mut n = Nested::new();
        n.map_guest_ram();
        n.fl_map(VA, gpa, PageSize::Size4K, R | W | U);
        n
    };
    let fault = |r: Result<Translation, WalkFault>| {
        let f = r.unwrap_err();
        (f.reason, f.stage)
    };

    // The root table unreadable through the second level: SFL.6.
    let mut n = setup();
    n.protect_guest_page(n.fl_cfg.root, W);
    assert_eq!(
        fault(n.walk(VA, AccessRequest::READ)),
        (Sfl6, Stage::SecondLevel)
    );

    // A lower table unreadable: SFL.7.
    let mut n = setup();
    let pd = n.fl_table(VA, 2);
    n.protect_guest_page(pd, W);
    assert_eq!(
        fault(n.walk(VA, AccessRequest::READ)),
        (Sfl7, Stage::SecondLevel)
    );

    // A table the first level must update but the second level keeps read-only: SFL.8,
    // unless nothing needs updating.
    let mut n = setup();
    let pt = n.fl_table(VA, 1);
    n.protect_guest_page(pt, R);
    let mut rec = WalkRecord::default();
    let r = walk_nested(
        &n.mem,
        &n.fl_cfg,
        &n.sl_cfg,
        VA,
        AccessRequest::READ,
        &mut rec,
    );
    assert_eq!(fault(r), (Sfl8, Stage::SecondLevel));
    let last_fl = rec
        .steps
        .iter()
        .rev()
        .find(|s| s.stage == Stage::FirstLevel)
        .unwrap();
    assert_eq!(
        (last_fl.level, last_fl.outcome),
        (1, StepOutcome::Fault(Sfl8))
    );
    let mut n = setup();
    n.walk(VA, AccessRequest::READ).unwrap();
    let pt = n.fl_table(VA, 1);
    n.protect_guest_page(pt, R);
    assert!(n.walk(VA, AccessRequest::READ).is_ok());
    assert_eq!(
        fault(n.walk(VA, AccessRequest::WRITE)),
        (Sfl8, Stage::SecondLevel)
    );

    // A table missing from the second level: SSL.2.
    let mut n = setup();
    let pdpt = n.fl_table(VA, 3);
    n.sl.unmap(&n.mem, pdpt, PageSize::Size4K).unwrap();
    let f = n.walk(VA, AccessRequest::READ).unwrap_err();
    assert_eq!(
        (f.reason, f.stage, f.input),
        (Ssl2, Stage::SecondLevel, pdpt)
    );

    // First-level addresses beyond the second level's 39 bits: SFL.5.
    let n = setup();
    let guest = Offset {
        inner: &n.mem,
        base: GUEST_BASE,
    };
    let pde = n.fl.entry_address(&guest, VA, 2).unwrap().unwrap();
    let e = guest.read_u64(pde).unwrap();
    guest
        .write_u64(pde, (e & !FlPte::ADDR_MASK) | 1 << 42)
        .unwrap();
    assert_eq!(
        fault(n.walk(VA, AccessRequest::READ)),
        (Sfl5, Stage::SecondLevel)
    );
    let mut n = setup();
    n.fl_map(VA + 0x1000, 1 << 42, PageSize::Size4K, R | U);
    assert_eq!(
        fault(n.walk(VA + 0x1000, AccessRequest::READ)),
        (Sfl5, Stage::SecondLevel)
    );

    // The final address is checked with the request's own rights.
    let mut n = setup();
    n.protect_guest_page(gpa, R);
    assert!(n.walk(VA, AccessRequest::READ).is_ok());
    assert_eq!(
        fault(n.walk(VA, AccessRequest::WRITE)),
        (Sgn6, Stage::SecondLevel)
    );
    n.protect_guest_page(gpa, W);
    assert_eq!(
        fault(n.walk(VA, AccessRequest::READ)),
        (Sgn7, Stage::SecondLevel)
    );
    let t = n.walk(VA, AccessRequest::WRITE).unwrap();
    assert!(!t.perms.read && t.perms.write);
}

// ---------------------------------------------------------------------------------------
// Nested = first level over guest physical memory, then second level

/// Guest physical memory as the composition sees it: every access goes through a
/// second-level walk (reads as reads, updates as writes), and a refusal is a memory error.
struct ThroughSecondLevel<'a> {
    mem: &'a TestMemory,
    sl: &'a SlConfig,
}

impl ThroughSecondLevel<'_> {
    fn resolve(&self, addr: u64, write: bool) -> Result<u64, MemError> {
        let access = if write {
            AccessRequest::WRITE
        } else {
            AccessRequest::READ
        };
        walk_second_level(self.mem, self.sl, addr, access, &mut ())
            .map(|t| t.output)
            .map_err(|_| MemError::OutOfRange { addr, len: 8 })
    }
}

impl PhysMem for ThroughSecondLevel<'_> {
    fn read_u64(&self, addr: u64) -> Result<u64, MemError> {
        self.mem.read_u64(self.resolve(addr, false)?)
    }
    fn fetch_or_u64(&self, addr: u64, bits: u64) -> Result<u64, MemError> {
        self.mem.fetch_or_u64(self.resolve(addr, true)?, bits)
    }
    fn compare_exchange_u64(&self, addr: u64, old: u64, new: u64) -> Result<u64, MemError> {
        self.mem
            .compare_exchange_u64(self.resolve(addr, true)?, old, new)
    }
    fn write_u64(&self, addr: u64, value: u64) -> Result<(), MemError> {
        self.mem.write_u64(self.resolve(addr, true)?, value)
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.mem.read(self.resolve(addr, false)?, buf)
    }
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemError> {
        self.mem.write(self.resolve(addr, true)?, buf)
    }
}

/// Second-level rights by code: 0 unmapped, then R, W, RW, RWX, RX.
fn sl_flags(code: u8) -> Option<MapFlags> {
    match code {
        1 => Some(R),
        2 => Some(W),
        3 => Some(R | W),
        4 => Some(R | W | X),
        5 => Some(R | X),
        _ => None,
    }
}

fn composed(
    mem: &TestMemory,
    fl: &FlConfig,
    sl: &SlConfig,
    gva: u64,
    access: AccessRequest,
) -> Result<Translation, WalkFault> {
    let view = ThroughSecondLevel { mem, sl };
    let first = walk_first_level(&view, fl, gva, access, &mut ())?;
    let second = walk_second_level(mem, sl, first.output, access, &mut ())?;
    Ok(Translation {
        output: second.output,
        page_size: first.page_size.min(second.page_size),
        perms: first.perms.intersect(second.perms),
        dirty: first.dirty && second.dirty,
    })
}

type Query = (u64, u64, bool, bool, bool);

#[allow(clippy::too_many_arguments)]
fn check_nested_equals_composition(
    sl_pages: &[u8],
    sl_large: [bool; 2],
    fl_maps: &[(u64, u64, u8, bool)],
    queries: &[Query],
    slade: bool,
    slee: bool,
    wpe: bool,
    eafe: bool,
) -> Result<(), TestCaseError> {
    let mut n = Nested::new();
    n.sl_cfg.slade = slade;
    n.sl_cfg.slee = slee;
    n.fl_cfg.wpe = wpe;
    n.fl_cfg.eafe = eafe;
    for region in 0..2u64 {
        if sl_large[region as usize] {
            if let Some(f) = sl_flags(sl_pages[region as usize * 512]) {
                n.sl_map(region * 2 * MB, PageSize::Size2M, f);
            }
        } else {
            for i in 0..512u64 {
                let page = region * 512 + i;
                if let Some(f) = sl_flags(sl_pages[page as usize]) {
                    n.sl_map(page * 4096, PageSize::Size4K, f);
                }
            }
        }
    }
    for &(gva_index, gpa_index, flags, large) in fl_maps {
        let gva = 0x7f00_0000_0000 + gva_index * 2 * MB;
        let size = if large {
            PageSize::Size2M
        } else {
            PageSize::Size4K
        };
        let gpa = if gpa_index < 1024 {
            (gpa_index * 4096) & !(size.bytes() - 1)
        } else {
            1 << 42
        };
        let mut f = R;
        for (bit, flag) in [(1, W), (2, X), (4, U), (8, U)] {
            if flags & bit != 0 {
                f = f | flag;
            }
        }
        let guest = Offset {
            inner: &n.mem,
            base: GUEST_BASE,
        };
        // Overlapping picks are simply refused by the builder.
        let _ = n.fl.map(&guest, &mut n.fl_frames, gva, gpa, size, f);
    }
    let other = n.mem.snapshot();
    for &(pick, offset, write, execute, supervisor) in queries {
        // Mostly addresses the first level maps, sometimes any of the eight slots.
        let gva_index = match pick {
            0..8 => fl_maps[pick as usize % fl_maps.len()].0,
            _ => pick - 8,
        };
        let gva = 0x7f00_0000_0000 + gva_index * 2 * MB + offset * 8;
        let access = AccessRequest {
            write,
            execute,
            supervisor,
        };
        let nested = n.walk(gva, access);
        let reference = composed(&other, &n.fl_cfg, &n.sl_cfg, gva, access);
        match (nested, reference) {
            (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
            (Err(a), Err(b)) => match (b.stage, b.reason) {
                // The composition's first level met a second-level refusal as a memory error.
                (Stage::FirstLevel, Sfl1 | Sfl4 | Sfl10) => {
                    prop_assert_eq!(a.stage, Stage::SecondLevel);
                    prop_assert!(
                        matches!(a.reason, Sfl5 | Sfl6 | Sfl7 | Sfl8 | Ssl1 | Ssl2 | Ssl3),
                        "{:?} for {:?}",
                        a,
                        b
                    );
                }
                (Stage::SecondLevel, Sgn4) => prop_assert_eq!(a.reason, Sfl5),
                _ => prop_assert_eq!(a, b),
            },
            (a, b) => prop_assert!(false, "nested {:?} but composed {:?}", a, b),
        }
        // Both made the same accessed/dirty updates.
        prop_assert_eq!(n.mem.diff(&other), vec![]);
    }
    Ok(())
}

fn sl_code() -> impl Strategy<Value = u8> {
    // Mostly mapped read-write, so that most walks get deep.
    prop_oneof![
        30 => Just(3u8),
        2 => Just(0u8),
        2 => Just(1u8),
        2 => Just(2u8),
        2 => Just(4u8),
        2 => Just(5u8),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn nested_equals_first_level_then_second_level(
        sl_pages in prop::collection::vec(sl_code(), 1024),
        sl_large in any::<[bool; 2]>(),
        fl_maps in prop::collection::vec((0u64..8, 0u64..1040, 0u8..16, any::<bool>()), 1..12),
        queries in prop::collection::vec(
            (
                0u64..16,
                prop_oneof![0u64..512, 0u64..(1 << 18)],
                any::<bool>(),
                any::<bool>(),
                any::<bool>(),
            ),
            1..16,
        ),
        slade in any::<bool>(),
        slee in any::<bool>(),
        wpe in any::<bool>(),
        eafe in any::<bool>(),
    ) {
        check_nested_equals_composition(
            &sl_pages, sl_large, &fl_maps, &queries, slade, slee, wpe, eafe,
        )?;
    }
}

// ---------------------------------------------------------------------------------------
// Walks that start below the top (what paging-structure caches hold)

/// The first-level starts a recorded walk passed through, top first: each table the walk
/// went down to, with the rights accumulated above it.
fn fl_starts(cfg: &FlConfig, rec: &WalkRecord) -> Vec<FlStart> {
    let mut start = FlStart::top(cfg);
    let mut starts = vec![start];
    for step in rec.steps.iter().filter(|s| s.stage == Stage::FirstLevel) {
        if let StepOutcome::Table(next) = step.outcome {
            start = start.below(step.entry);
            assert_eq!(start.table, next);
            starts.push(start);
        }
    }
    starts
}

/// The second-level starts a recorded walk passed through, top first.
fn sl_starts(cfg: &SlConfig, rec: &WalkRecord) -> Vec<SlStart> {
    let mut start = SlStart::top(cfg);
    let mut starts = vec![start];
    for step in &rec.steps {
        if let StepOutcome::Table(next) = step.outcome {
            start = start.below(cfg, step.entry);
            assert_eq!(start.table, next);
            starts.push(start);
        }
    }
    starts
}

#[test]
fn first_level_from_each_table_equals_the_full_walk_and_reads_only_below() {
    for mode in [FlPagingMode::FourLevel, FlPagingMode::FiveLevel] {
        let mut s = FlSetup::new(mode);
        s.map(VA, 0x5000, PageSize::Size4K, R | W | U);
        s.map(VA + 2 * MB, 0x40_0000, PageSize::Size2M, R | W | U);
        for va in [VA + 0x18, VA + 2 * MB + 0x1234] {
            let (full, rec) = s.record(va, AccessRequest::WRITE.supervisor());
            let full = full.unwrap();
            let starts = fl_starts(&s.cfg, &rec);
            assert_eq!(starts.len(), rec.steps.len());
            for start in starts {
                let mut below = WalkRecord::default();
                let t = walk_first_level_from(
                    &s.mem,
                    &s.cfg,
                    &mut Direct,
                    start,
                    va,
                    AccessRequest::WRITE.supervisor(),
                    &mut below,
                )
                .unwrap();
                assert_eq!(t, full);
                assert_eq!(below.steps.first().unwrap().level, start.level);
                assert_eq!(
                    below.steps.len(),
                    rec.steps.len() - (mode.levels() - start.level) as usize
                );
            }
        }
    }
}

#[test]
fn first_level_from_a_start_keeps_its_rights_and_skips_the_entries_above() {
    let mut s = FlSetup::new(FlPagingMode::FourLevel);
    s.map(VA, 0x5000, PageSize::Size4K, R | W | X | U);
    // The PDPE is read-only and execute-disable: both reach the page-table start.
    let e = s.entry(VA, 3);
    s.set_entry(VA, 3, (e & !FlPte::RW) | FlPte::XD);
    let (_, rec) = s.record(VA, AccessRequest::READ);
    let pt = *fl_starts(&s.cfg, &rec).last().unwrap();
    assert_eq!(pt.level, 1);
    assert_eq!(
        pt.rights,
        FlRights {
            user: true,
            writable: false,
            execute_disable: true,
        }
    );
    let from = |s: &FlSetup, start, access| {
        walk_first_level_from(&s.mem, &s.cfg, &mut Direct, start, VA, access, &mut ())
    };
    assert_eq!(reason(from(&s, pt, AccessRequest::WRITE)), Sgn6);
    assert_eq!(reason(from(&s, pt, AccessRequest::EXECUTE)), Sgn3);
    // The entries above are not read again: clearing the PML4E changes nothing from the
    // page-table start, as a paging-structure cache entry keeps working until invalidated.
    s.set_entry(VA, 4, 0);
    assert_eq!(reason(s.walk(VA, AccessRequest::READ)), Sfl2);
    assert_eq!(
        from(&s, pt, AccessRequest::READ).unwrap().output,
        0x5000,
        "the cached page table is still used"
    );
    // The request checks are made from any start.
    assert_eq!(
        reason(walk_first_level_from(
            &s.mem,
            &s.cfg,
            &mut Direct,
            pt,
            0x0000_8000_0000_0000,
            AccessRequest::READ,
            &mut ()
        )),
        Sgn1
    );
}

#[test]
fn first_level_start_level_out_of_range_walks_from_the_top() {
    let mut s = FlSetup::new(FlPagingMode::FourLevel);
    s.map(VA, 0x5000, PageSize::Size4K, R | U);
    let (full, rec) = s.record(VA, AccessRequest::READ);
    for level in [0, 5, 9] {
        let start = FlStart {
            level,
            table: 0x1234_5000,
            rights: FlRights {
                user: false,
                writable: false,
                execute_disable: true,
            },
        };
        let mut again = WalkRecord::default();
        let t = walk_first_level_from(
            &s.mem,
            &s.cfg,
            &mut Direct,
            start,
            VA,
            AccessRequest::READ,
            &mut again,
        );
        assert_eq!(t, full);
        assert_eq!(again.steps.len(), rec.steps.len());
    }
}

#[test]
fn second_level_from_each_table_equals_the_full_walk() {
    for levels in [SlLevels::Three, SlLevels::Four, SlLevels::Five] {
        let mut s = SlSetup::new(levels);
        s.map(IOVA, 0x6000, PageSize::Size4K, R | W);
        let mut rec = WalkRecord::default();
        let full =
            walk_second_level(&s.mem, &s.cfg, IOVA + 8, AccessRequest::WRITE, &mut rec).unwrap();
        let starts = sl_starts(&s.cfg, &rec);
        assert_eq!(starts.len(), levels.levels() as usize);
        for start in starts {
            let mut below = WalkRecord::default();
            let t = walk_second_level_from(
                &s.mem,
                &s.cfg,
                start,
                IOVA + 8,
                AccessRequest::WRITE,
                &mut below,
            )
            .unwrap();
            assert_eq!(t, full);
            assert_eq!(below.steps.len(), start.level as usize);
        }
        // Out-of-range levels walk from the top; the input width is checked from any start.
        let bogus = SlStart {
            level: 0,
            ..SlStart::top(&s.cfg)
        };
        assert_eq!(
            walk_second_level_from(
                &s.mem,
                &s.cfg,
                bogus,
                IOVA + 8,
                AccessRequest::WRITE,
                &mut ()
            ),
            Ok(full)
        );
        let pt = *sl_starts(&s.cfg, &rec).last().unwrap();
        let wide = 1u64 << levels.input_width();
        assert_eq!(
            walk_second_level_from(&s.mem, &s.cfg, pt, wide, AccessRequest::READ, &mut ())
                .unwrap_err()
                .reason,
            Sgn4
        );
    }
}

#[test]
fn second_level_start_keeps_the_rights_above() {
    let mut s = SlSetup::new(SlLevels::Four);
    s.cfg.slee = true;
    s.map(IOVA, 0x6000, PageSize::Size4K, R | W | X);
    let e = s.entry(IOVA, 3);
    s.set_entry(IOVA, 3, e & !(SlPte::W | SlPte::X));
    let mut rec = WalkRecord::default();
    walk_second_level(&s.mem, &s.cfg, IOVA, AccessRequest::READ, &mut rec).unwrap();
    let pt = *sl_starts(&s.cfg, &rec).last().unwrap();
    assert_eq!(
        pt.rights,
        Permissions {
            read: true,
            write: false,
            execute: false,
            user: true,
        }
    );
    // Restoring the entry does not reach the start: it holds what was read.
    s.set_entry(IOVA, 3, e);
    let from = |access| walk_second_level_from(&s.mem, &s.cfg, pt, IOVA, access, &mut ());
    assert_eq!(from(AccessRequest::WRITE).unwrap_err().reason, Sgn6);
    assert_eq!(from(AccessRequest::EXECUTE).unwrap_err().reason, Sgn3);
    assert!(s.walk(IOVA, AccessRequest::WRITE).is_ok());
}

#[test]
fn nested_stage_walks_from_a_second_level_start_equal_the_full_ones() {
    let mut n = Nested::new();
    n.map_guest_ram();
    n.fl_map(VA, 0x20_3000, PageSize::Size4K, R | W | U);
    let stage = NestedStage {
        mem: &n.mem,
        sl: &n.sl_cfg,
    };
    let table = n.fl_table(VA, 1);
    let mut rec = WalkRecord::default();
    let full = stage
        .walk_table_from(SlStart::top(&n.sl_cfg), table, false, true, &mut rec)
        .unwrap();
    let table_starts = sl_starts(&n.sl_cfg, &rec);
    for &start in &table_starts {
        assert_eq!(
            stage.walk_table_from(start, table, false, true, &mut ()),
            Ok(full)
        );
    }
    let mut rec = WalkRecord::default();
    let out = stage
        .walk_output_from(
            SlStart::top(&n.sl_cfg),
            0x20_3010,
            AccessRequest::READ,
            &mut rec,
        )
        .unwrap();
    assert_eq!(out.output, GUEST_BASE + 0x20_3010);
    for start in sl_starts(&n.sl_cfg, &rec) {
        assert_eq!(
            stage.walk_output_from(start, 0x20_3010, AccessRequest::READ, &mut ()),
            Ok(out)
        );
    }
    // The nested faults are kept from a lower start: a read-protected table page is SFL.7.
    n.protect_guest_page(table, W);
    let stage = NestedStage {
        mem: &n.mem,
        sl: &n.sl_cfg,
    };
    let last = *table_starts.last().unwrap();
    assert_eq!(
        stage
            .walk_table_from(last, table, false, false, &mut ())
            .unwrap_err()
            .reason,
        Sfl7
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A walk from any table a full walk passed through gives the full walk's result,
    /// translation or fault, for any request.
    #[test]
    fn a_walk_from_any_passed_table_equals_the_full_walk(
        maps in prop::collection::vec((0u64..8, 0u64..64, 0u8..16, any::<bool>()), 1..10),
        upper in prop::collection::vec((0u64..8, 2u8..5, 0u8..8), 0..6),
        queries in prop::collection::vec((0u64..8, 0u64..4, any::<bool>(), any::<bool>(), any::<bool>()), 1..12),
        wpe in any::<bool>(),
    ) {
        let mut s = FlSetup::new(FlPagingMode::FourLevel);
        s.cfg.wpe = wpe;
        let slot = |i: u64| 0x7f00_0000_0000 + (i % 4) * (1 << 39) / 4 + (i / 4) * 2 * MB;
        for &(i, page, flags, large) in &maps {
            let size = if large { PageSize::Size2M } else { PageSize::Size4K };
            let mut f = R;
            for (bit, flag) in [(1, W), (2, X), (4, U), (8, U)] {
                if flags & bit != 0 {
                    f = f | flag;
                }
            }
            let va = slot(i) + if large { 0 } else { (page % 4) * 4096 };
            let pa = (page * 4096) & !(size.bytes() - 1);
            let _ = s.table.map(&s.mem, &mut s.frames, va, pa, size, f);
        }
        // Take rights away at upper levels (RW, U/S, add XD).
        for &(i, level, bits) in &upper {
            if let Ok(Some(addr)) = s.table.entry_address(&s.mem, slot(i), level) {
                let e = s.mem.read_u64(addr).unwrap();
                if e & FlPte::P != 0 && !FlPte(e).is_leaf(level) {
                    let mut e = e;
                    if bits & 1 != 0 { e &= !FlPte::RW; }
                    if bits & 2 != 0 { e &= !FlPte::US; }
                    if bits & 4 != 0 { e |= FlPte::XD; }
                    s.mem.write_u64(addr, e).unwrap();
                }
            }
        }
        for &(i, page, write, execute, supervisor) in &queries {
            let va = slot(i) + page * 4096 + 0x10;
            let access = AccessRequest { write, execute, supervisor };
            let (full, rec) = s.record(va, access);
            for start in fl_starts(&s.cfg, &rec) {
                let again = walk_first_level_from(&s.mem, &s.cfg, &mut Direct, start, va, access, &mut ());
                prop_assert_eq!(again, full);
            }
        }
    }
}

/// Flag bits of a second-level entry the fast-path agreement test draws from: R, W, X,
/// PS, A, D, SNP (bit 11), TM (bit 62), an ignored bit (52) and a reserved address bit
/// (bit 50, above the 46-bit width).
fn sl_entry_flags() -> impl Strategy<Value = u64> {
    let bits = [
        SlPte::R,
        SlPte::W,
        SlPte::X,
        SlPte::PS,
        SlPte::A,
        SlPte::D,
        SlPte::SNP,
        SlPte::TM,
        1 << 52,
        1 << 50,
    ];
    // Mostly present, mostly nothing reserved: every branch of the fast path is reached.
    (prop::bits::u16::between(0, bits.len()), 0u8..4).prop_map(move |(set, common)| {
        let mut flags = bits
            .iter()
            .enumerate()
            .filter(|&(i, _)| set & (1 << i) != 0)
            .fold(0, |f, (_, &b)| f | b);
        if common != 0 {
            flags = (flags & (SlPte::X | SlPte::A | SlPte::D)) | SlPte::R | SlPte::W;
        }
        flags
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The walker's fast path (table pointers and 4 KiB leaves decided by one mask test
    /// each) decides every entry as the general path does: the same translation or fault,
    /// the same steps, the same accessed and dirty updates in memory.
    #[test]
    fn second_level_fast_path_agrees_with_the_general_path(
        flags in prop::collection::vec(sl_entry_flags(), 4),
        write: bool,
        execute: bool,
        slade: bool,
        slee: bool,
    ) {
        // Four tables at 0x1000 ... 0x4000, each entry at index 0, then a page at 0x5000.
        let fast_mem = TestMemory::new(0x8000);
        for (i, f) in flags.iter().enumerate() {
            let next = 0x2000 + 0x1000 * i as u64;
            fast_mem.write_u64(0x1000 * (i as u64 + 1), next | f).unwrap();
        }
        let slow_mem = fast_mem.snapshot();
        let cfg = SlConfig {
            root: 0x1000,
            levels: SlLevels::Four,
            slee,
            slade,
            format: SlFormat::new(46).unwrap(),
        };
        let access = AccessRequest { write, execute, supervisor: false };
        let input = 0x123;
        let mut fast_rec = WalkRecord::default();
        let fast = walk_second_level(&fast_mem, &cfg, input, access, &mut fast_rec);
        let mut slow_rec = WalkRecord::default();
        let first = second::Entry {
            table: 0x1000,
            level: 4,
            address: 0x1000,
            raw: slow_mem.read_u64(0x1000).unwrap(),
        };
        let rights = SlPte::R | SlPte::W | SlPte::X;
        let slow = second::walk_entries(
            &slow_mem, &cfg, first, rights, input, access, &second::SlFaults::REQUEST,
            &mut slow_rec,
        );
        prop_assert_eq!(fast, slow);
        prop_assert_eq!(fast_rec, slow_rec);
        prop_assert!(fast_mem.diff(&slow_mem).is_empty());
    }
}
