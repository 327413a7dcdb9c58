#![cfg(target_arch = "x86_64")]
//! vsva's first-level walker against the x86 MMU, with KVM as the oracle.
//!
//! Each scenario builds one random IA-32e page table with vsva's `PageTableBuilder` in the
//! VM's RAM: the harness pages, a cluster of 4 KiB / 2 MiB / 1 GiB mappings with random
//! rights and attribute bits, and random damage (entries made not-present, read-only,
//! supervisor-only or execute-disabled at any level, reserved bits set, ignored bits set).
//! Then many probes: for each, vsva's walker (`walk_first_level`) translates the address
//! over a private copy of the tables, and the vCPU performs the same access at the same
//! privilege. They must agree:
//!
//! - on success, on the physical byte reached: a read returns the nonce placed at the
//!   walker's output address, a write lands there, an execute runs the snippet placed there;
//! - on failure, on the fault class: SFL.2 is a #PF with P = 0, SFL.3 one with P = 1 and
//!   RSVD = 1, SGN.2/SGN.3/SGN.6 one with P = 1 and RSVD = 0 (and CR2 is the address);
//! - after a successful access, on every accessed and dirty bit of the tables.
//!
//! Where VT-d's rules differ from the CPU's on purpose, the walker is checked against the
//! VT-d rule instead (VT-d spec §3.6.1, §3.6.2, §9.6):
//! - Supervisor-privilege requests: with the PASID entry's SRE clear they are refused
//!   outright (SPT.6) before any entry is read; the CPU has no such switch. Checked on every
//!   supervisor probe with a second walk, SRE = 0, which must fault SPT.6 and set no bit.
//! - WPE is CR0.WP: each scenario runs the vCPU with CR0.WP equal to its WPE.
//! - Supervisor execute requests to user pages always fault in VT-d, as with CR4.SMEP = 1.
//!   The vCPU runs with SMEP when it has it; without SMEP it executes such pages (KVM's PVM
//!   backend raises #GP at the page instead), and the walker must report SGN.3 while
//!   everything else about the page allows execution.
//! - EAFE: the IOMMU sets the extended-accessed bit (bit 10, ignored by the CPU) with A.
//!   Scenarios with EAFE compare A/D with bit 10 masked and require bit 10 in every entry
//!   of a successful walk.
//! - VT-d has no SMAP and no protection keys: the vCPU runs with CR4.SMAP and CR4.PKE clear.
//! - Reserved bits follow VT-d (and the Intel SDM). AMD CPUs also reserve bit 8 of PML4 and
//!   PML5 entries, so that bit is only set in those entries on Intel hosts.
//! - A/D bits on faulting walks are not compared: the SDM lets the CPU set accessed bits in
//!   entries it used before the fault, KVM's software walker sets none, and the walker sets
//!   them in the upper entries it passed. The differences are counted and printed.
//!
//! 1 GiB pages are compared with the walker's FL1GP equal to the vCPU's 1 GiB page support:
//! where KVM offers none, both sides must treat PS in a PDPE as a reserved bit.
//!
//! KVM may shadow the guest's tables in software (PVM, or no two-dimensional paging), and
//! its shadows only follow the guest's own writes; so the tables of one scenario are
//! written before its first probe, the walker's A/D updates go to a private copy, and KVM
//! forgets its translations before each new scenario.
//!
//! Set `VSVA_ORACLE_SEED` to replay a run.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use vsva_hw::HostMemory;
use vsva_kvm_oracle::{
    guest, pf, Access, CpuFeatures, Machine, OracleError, Outcome, PagingMode, Privilege, Probe,
};
use vsva_vtd::walk::WalkStep;
use vsva_vtd::{
    walk_first_level, AccessRequest, FaultReason, FlConfig, FlFormat, FlPagingMode, FlPte,
    FrameSource, MapFlags, MemError, PageSize, PageTableBuilder, PhysMem, TableFormat, WalkRecord,
};

/// Guest RAM: sparse, so only the pages probes touch cost memory.
const RAM: u64 = 4 << 30;
/// Table frames of one scenario.
const TABLES: (u64, u64) = (guest::FIRST_FREE_GPA, 64 << 20);
/// Frames of 4 KiB and 2 MiB pages.
const SMALL_PAGES: (u64, u64) = (64 << 20, 1 << 30);
/// Frames of 1 GiB pages.
const HUGE_PAGES: (u64, u64) = (1 << 30, RAM);
const SCENARIOS: usize = 120;
const PROBES_PER_SCENARIO: usize = 100;
const MAPPINGS_PER_SCENARIO: usize = 24;
/// Disagreements described in full before the test fails.
const REPORTED: usize = 12;

/// SplitMix64: small, seedable, good enough to spread probes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    fn in_range(&mut self, hi: u32, lo: u32) -> u32 {
        lo + self.below(u64::from(hi - lo + 1)) as u32
    }
}

/// Table frames for the builder: a bump allocator over [`TABLES`] that remembers every
/// frame it handed out, so the test knows which memory holds tables.
struct TableFrames {
    next: u64,
    free: Vec<u64>,
    live: Vec<u64>,
}

impl TableFrames {
    fn new() -> Self {
        TableFrames {
            next: TABLES.0,
            free: Vec::new(),
            live: Vec::new(),
        }
    }
}

impl FrameSource for TableFrames {
    fn alloc_table(&mut self) -> Option<u64> {
        let frame = match self.free.pop() {
            Some(f) => f,
            None if self.next < TABLES.1 => {
                self.next += 4096;
                self.next - 4096
            }
            None => return None,
        };
        self.live.push(frame);
        Some(frame)
    }

    fn free_table(&mut self, frame: u64) {
        self.live.retain(|&f| f != frame);
        self.free.push(frame);
    }
}

/// The walker's view of memory: the table frames are private copies, so that its
/// accessed/dirty updates land beside the vCPU's instead of on top of them; any other
/// address reads through to RAM and cannot be written.
struct WalkerView<'a> {
    ram: &'a HostMemory,
    tables: RefCell<HashMap<u64, Box<[u64; 512]>>>,
}

impl<'a> WalkerView<'a> {
    fn new(ram: &'a HostMemory, frames: &[u64]) -> Self {
        let view = WalkerView {
            ram,
            tables: RefCell::new(frames.iter().map(|&f| (f, Box::new([0; 512]))).collect()),
        };
        for &f in frames {
            view.sync(f);
        }
        view
    }

    /// Copies the RAM frame `frame` into the view.
    fn sync(&self, frame: u64) {
        let ram = read_frame(self.ram, frame);
        self.tables.borrow_mut().insert(frame, Box::new(ram));
    }

    fn entry(&self, frame: u64, index: usize) -> u64 {
        self.tables.borrow()[&frame][index]
    }

    fn update(&self, addr: u64, f: impl FnOnce(&mut u64) -> u64) -> Result<u64, MemError> {
        if addr % 8 != 0 {
            return Err(MemError::Unaligned { addr, align: 8 });
        }
        let mut tables = self.tables.borrow_mut();
        let table = tables
            .get_mut(&(addr & !0xfff))
            .ok_or(MemError::OutOfRange { addr, len: 8 })?;
        Ok(f(&mut table[(addr & 0xfff) as usize / 8]))
    }
}

impl PhysMem for WalkerView<'_> {
    fn read_u64(&self, addr: u64) -> Result<u64, MemError> {
        if addr % 8 == 0 {
            if let Some(t) = self.tables.borrow().get(&(addr & !0xfff)) {
                return Ok(t[(addr & 0xfff) as usize / 8]);
            }
        }
        self.ram.read_u64(addr)
    }

    fn fetch_or_u64(&self, addr: u64, bits: u64) -> Result<u64, MemError> {
        self.update(addr, |e| {
            let old = *e;
            *e |= bits;
            old
        })
    }

    fn compare_exchange_u64(&self, addr: u64, old: u64, new: u64) -> Result<u64, MemError> {
        self.update(addr, |e| {
            let found = *e;
            if found == old {
                *e = new;
            }
            found
        })
    }

    fn write_u64(&self, addr: u64, value: u64) -> Result<(), MemError> {
        self.update(addr, |e| {
            *e = value;
            value
        })
        .map(|_| ())
    }

    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        for (i, b) in buf.iter_mut().enumerate() {
            let a = addr + i as u64;
            *b = self.read_u64(a & !7)?.to_le_bytes()[(a & 7) as usize];
        }
        Ok(())
    }

    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemError> {
        Err(MemError::OutOfRange {
            addr,
            len: buf.len() as u64,
        })
    }
}

fn read_frame(ram: &HostMemory, frame: u64) -> [u64; 512] {
    let mut bytes = [0u8; 4096];
    ram.read(frame, &mut bytes).expect("table frame in RAM");
    let mut entries = [0u64; 512];
    for (e, chunk) in entries.iter_mut().zip(bytes.chunks_exact(8)) {
        *e = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
    }
    entries
}

/// One mapping the scenario asked the builder for.
#[derive(Clone, Copy, Debug)]
struct Leaf {
    va: u64,
    size: PageSize,
}

/// One random page table and the VT-d configuration it is walked with.
struct Scenario {
    builder: PageTableBuilder,
    frames: TableFrames,
    /// Frames holding only harness tables.
    harness: HashSet<u64>,
    leaves: Vec<Leaf>,
    cfg: FlConfig,
    /// What was done to the tables, for reports.
    damage: Vec<String>,
}

impl Scenario {
    fn levels(&self) -> u8 {
        self.cfg.mode.levels()
    }

    fn input_width(&self) -> u32 {
        self.cfg.mode.input_width()
    }

    fn canonical(&self, va: u64) -> u64 {
        let shift = 64 - self.input_width();
        (((va << shift) as i64) >> shift) as u64
    }

    fn top_index(&self, va: u64) -> u64 {
        (va >> level_shift(self.levels())) & 511
    }

    /// Whether probes and mappings may use `va`: outside the harness's top-level slot and
    /// outside the hypervisor hole.
    fn usable(&self, va: u64) -> bool {
        self.top_index(va) != guest::HARNESS_TOP_INDEX
            && !guest::hypervisor_hole(paging_mode(self.cfg.mode)).contains(&va)
    }
}

fn paging_mode(mode: FlPagingMode) -> PagingMode {
    match mode {
        FlPagingMode::FourLevel => PagingMode::Level4,
        FlPagingMode::FiveLevel => PagingMode::Level5,
    }
}

fn map_flags(writable: bool, user: bool, executable: bool) -> MapFlags {
    let mut f = MapFlags::READ;
    if writable {
        f = f | MapFlags::WRITE;
    }
    if user {
        f = f | MapFlags::USER;
    }
    if executable {
        f = f | MapFlags::EXECUTE;
    }
    f
}

fn level_shift(level: u8) -> u32 {
    12 + 9 * (u32::from(level) - 1)
}

/// Builds one random scenario in `ram` with vsva's builder.
fn build_scenario(rng: &mut Rng, ram: &HostMemory, cpu: &CpuFeatures) -> Scenario {
    let mode = if cpu.la57 && rng.percent(50) {
        FlPagingMode::FiveLevel
    } else {
        FlPagingMode::FourLevel
    };
    let mut frames = TableFrames::new();
    let mut builder =
        PageTableBuilder::new(TableFormat::FirstLevel(mode), ram, &mut frames).expect("root table");
    for p in guest::HARNESS_PAGES {
        builder
            .map(
                ram,
                &mut frames,
                p.va,
                p.gpa,
                PageSize::Size4K,
                map_flags(p.writable, p.user, p.executable),
            )
            .expect("harness mapping");
    }
    let harness = frames.live[1..].iter().copied().collect();
    let cfg = FlConfig {
        root: builder.root(),
        mode,
        sre: true,
        wpe: rng.percent(70),
        eafe: rng.percent(30),
        format: FlFormat::new(cpu.max_phys_bits, cpu.gbpages).expect("address width"),
    };
    let mut sc = Scenario {
        builder,
        frames,
        harness,
        leaves: Vec::new(),
        cfg,
        damage: Vec::new(),
    };

    // Cluster the mappings: each level picks its index from a small pool, so they share
    // tables and damage to an upper entry covers several of them.
    let levels = sc.levels();
    let pools: BTreeMap<u8, Vec<u64>> = (1..=levels)
        .map(|l| {
            let n = if l == levels { 2 } else { 3 };
            let pool = (0..n)
                .map(|_| loop {
                    let i = rng.below(512);
                    if l != levels || sc.usable(sc.canonical(i << level_shift(l))) {
                        break i;
                    }
                })
                .collect();
            (l, pool)
        })
        .collect();
    for _ in 0..MAPPINGS_PER_SCENARIO {
        let size = match rng.below(10) {
            0..=4 => PageSize::Size4K,
            5..=7 => PageSize::Size2M,
            _ => PageSize::Size1G,
        };
        let mut va = 0;
        for l in size.level()..=levels {
            let index = if l == size.level() && rng.percent(50) {
                rng.below(512)
            } else {
                rng.pick(&pools[&l])
            };
            va |= index << level_shift(l);
        }
        let va = sc.canonical(va);
        let pa = match size {
            PageSize::Size1G => {
                HUGE_PAGES.0 + (rng.below((HUGE_PAGES.1 - HUGE_PAGES.0) >> 30) << 30)
            }
            _ => {
                let n = (SMALL_PAGES.1 - SMALL_PAGES.0) >> size.shift();
                SMALL_PAGES.0 + (rng.below(n) << size.shift())
            }
        };
        let flags = map_flags(rng.percent(60), rng.percent(60), rng.percent(60));
        if sc
            .builder
            .map(ram, &mut sc.frames, va, pa, size, flags)
            .is_err()
        {
            continue; // already mapped, or a page of another size in the way
        }
        sc.leaves.push(Leaf { va, size });
        if rng.percent(40) {
            let extra = leaf_extra_bits(rng, size);
            let slot = sc
                .builder
                .entry_address(ram, va, size.level())
                .expect("valid level")
                .expect("just mapped");
            let entry = ram.read_u64(slot).expect("table in RAM");
            sc.builder
                .write_entry(ram, va, size.level(), entry | extra)
                .expect("just mapped");
        }
    }
    for _ in 0..rng.below(7) {
        damage(rng, ram, cpu, &mut sc);
    }
    sc
}

/// Bits a leaf may carry that change nothing about the translation: A, D, G, PWT, PCD,
/// PAT, the software-available bits 11:9 and the ignored bits 62:52.
fn leaf_extra_bits(rng: &mut Rng, size: PageSize) -> u64 {
    let pat = if size == PageSize::Size4K {
        FlPte::PAT_4K
    } else {
        FlPte::PAT_LARGE
    };
    let candidates = [
        FlPte::A,
        FlPte::D,
        FlPte::G,
        FlPte::PWT,
        FlPte::PCD,
        pat,
        1 << 9,
        1 << 10,
        1 << 11,
        1 << rng.in_range(62, 52),
    ];
    (0..1 + rng.below(3)).fold(0, |acc, _| acc | rng.pick(&candidates))
}

/// Damages one entry on the path of a random mapping.
fn damage(rng: &mut Rng, ram: &HostMemory, cpu: &CpuFeatures, sc: &mut Scenario) {
    let Some(&leaf) = sc
        .leaves
        .get(rng.below(sc.leaves.len().max(1) as u64) as usize)
    else {
        return;
    };
    let level = rng.in_range(u32::from(sc.levels()), u32::from(leaf.size.level())) as u8;
    let Ok(Some(slot)) = sc.builder.entry_address(ram, leaf.va, level) else {
        return;
    };
    // An earlier damage may have sent the path outside RAM (address bits above the width).
    let Ok(entry) = ram.read_u64(slot) else {
        return;
    };
    if entry & FlPte::P == 0 {
        return;
    }
    let is_leaf = level == leaf.size.level();
    let width = u32::from(cpu.max_phys_bits);
    let (what, new) = match rng.below(7) {
        // Not present: every other bit is then ignored, reserved ones included.
        0 => (
            "not present",
            (entry | (rng.next() & !FlPte::ADDR_MASK)) & !FlPte::P,
        ),
        1 => ("read-only", entry & !FlPte::RW),
        2 => ("supervisor-only", entry & !FlPte::US),
        3 => ("execute-disable", entry | FlPte::XD),
        4 => {
            let mut candidates = Vec::new();
            if width < 52 {
                candidates.push(rng.in_range(51, width));
            }
            match (level, is_leaf) {
                (4 | 5, _) => candidates.push(7),
                (2, true) => candidates.push(rng.in_range(20, 13)),
                (3, true) if cpu.gbpages => candidates.push(rng.in_range(29, 13)),
                _ => {}
            }
            let Some(&bit) = candidates.get(rng.below(candidates.len().max(1) as u64) as usize)
            else {
                return;
            };
            ("reserved bit", entry | 1 << bit)
        }
        _ => {
            // Ignored bits: 62:52 and 11:9 everywhere, D and G in non-leaf entries (but
            // AMD reserves bit 8 of PML4 and PML5 entries, see the module comment).
            let mut candidates = vec![rng.in_range(62, 52), rng.in_range(11, 9)];
            if !is_leaf {
                candidates.push(6);
                if !(cpu.amd && level >= 4) {
                    candidates.push(8);
                }
            }
            ("ignored bit", entry | 1 << rng.pick(&candidates))
        }
    };
    sc.builder
        .write_entry(ram, leaf.va, level, new)
        .expect("entry exists");
    sc.damage.push(format!(
        "{what}: level {level} entry of {:#x} {entry:#x} -> {new:#x}",
        leaf.va
    ));
}

/// A random probe address: mostly inside a mapping, sometimes beside one (an absent entry
/// at some level), sometimes anywhere. Never where [`Scenario::usable`] forbids.
fn probe_address(rng: &mut Rng, sc: &Scenario, execute: bool) -> u64 {
    let va = loop {
        let va = match (rng.below(10), sc.leaves.is_empty()) {
            (0..=6, false) => {
                let leaf = rng.pick(&sc.leaves);
                leaf.va + rng.below(leaf.size.bytes())
            }
            (7..=8, false) => {
                let leaf = rng.pick(&sc.leaves);
                let level = rng.in_range(u32::from(sc.levels()), 1) as u8;
                let shift = level_shift(level);
                (leaf.va & !(511 << shift)) | rng.below(512) << shift
            }
            _ => rng.next(),
        };
        let va = sc.canonical(va);
        if sc.usable(va) {
            break va;
        }
    };
    // Data accesses are 8 bytes and never cross a page; the execute snippet needs 16.
    if execute {
        va & !(guest::EXEC_SNIPPET_LEN as u64 - 1)
    } else {
        va & !7
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum FaultClass {
    NotPresent,
    Reserved,
    Protection,
}

fn walker_class(reason: FaultReason) -> Option<FaultClass> {
    match reason {
        FaultReason::Sfl2 => Some(FaultClass::NotPresent),
        FaultReason::Sfl3 => Some(FaultClass::Reserved),
        FaultReason::Sgn2 | FaultReason::Sgn3 | FaultReason::Sgn6 => Some(FaultClass::Protection),
        _ => None,
    }
}

fn cpu_class(error_code: u64) -> FaultClass {
    if error_code & pf::PRESENT == 0 {
        FaultClass::NotPresent
    } else if error_code & pf::RESERVED != 0 {
        FaultClass::Reserved
    } else {
        FaultClass::Protection
    }
}

/// The byte a walk reached, from its record, whether or not the request was allowed: the
/// last entry read, if it is a present leaf.
fn reached(rec: &WalkRecord, va: u64) -> Option<u64> {
    let last = rec.steps.last()?;
    let entry = FlPte(last.entry);
    let size = PageSize::from_level(last.level).filter(|_| entry.is_leaf(last.level))?;
    entry
        .present()
        .then(|| entry.page_address(size) | (va & (size.bytes() - 1)))
}

/// Whether the only thing refusing the walk is VT-d's supervisor-execute rule: a
/// supervisor execute request that reached a leaf through entries that are all
/// user-accessible and without XD.
fn refused_only_as_user_page(rec: &WalkRecord, req: AccessRequest, va: u64) -> bool {
    req.supervisor
        && req.execute
        && reached(rec, va).is_some()
        && rec.steps.iter().all(|s: &WalkStep| {
            let e = FlPte(s.entry);
            e.user() && !e.execute_disable()
        })
}

#[derive(Default)]
struct Tally {
    probes: u64,
    by_result: BTreeMap<String, u64>,
    vtd_rule: BTreeMap<&'static str, u64>,
    ad_compared: u64,
    /// Faulting walks after which the walker had set bits the vCPU had not, and the
    /// other way round.
    ad_on_fault: [u64; 2],
    disagreements: Vec<String>,
}

impl Tally {
    fn count(&mut self, key: String) {
        *self.by_result.entry(key).or_default() += 1;
    }
}

#[test]
fn first_level_walker_agrees_with_the_mmu() {
    let boot = std::time::Instant::now();
    let mut machine = match Machine::new(RAM) {
        Ok(m) => m,
        // Only a missing /dev/kvm skips; any other set-up failure fails the test.
        Err(OracleError::Unavailable(why)) => {
            eprintln!("skipping the KVM oracle: {why}");
            return;
        }
        Err(e) => panic!("starting the oracle VM: {e}"),
    };
    let cpu = machine.features();
    let seed = std::env::var("VSVA_ORACLE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0ac1);
    eprintln!(
        "KVM oracle: VM up in {:.1?}; {cpu:?}; seed {seed} (VSVA_ORACLE_SEED)",
        boot.elapsed()
    );
    let ram: Arc<HostMemory> = machine.memory().clone();
    let mut rng = Rng(seed);
    let mut tally = Tally::default();
    let started = std::time::Instant::now();

    for scenario in 0..SCENARIOS {
        let sc = build_scenario(&mut rng, &ram, &cpu);
        machine
            .forget_translations()
            .expect("dropping KVM's translations");
        let view = WalkerView::new(&ram, &sc.frames.live);
        for _ in 0..PROBES_PER_SCENARIO {
            run_probe(
                &mut rng,
                &mut machine,
                &ram,
                &sc,
                &view,
                &cpu,
                &mut tally,
                scenario,
            );
        }
        let Scenario {
            builder,
            mut frames,
            ..
        } = sc;
        builder.destroy(&mut frames);
    }

    let elapsed = started.elapsed();
    eprintln!(
        "{} probes over {SCENARIOS} tables in {elapsed:.1?}; A/D compared after {} successful accesses; \
         after faulting walks (not compared, see the module comment) the walker alone had set bits \
         {} times, the vCPU alone {} times",
        tally.probes, tally.ad_compared, tally.ad_on_fault[0], tally.ad_on_fault[1]
    );
    for (k, n) in &tally.by_result {
        eprintln!("  {n:6}  {k}");
    }
    for (k, n) in &tally.vtd_rule {
        eprintln!("  {n:6}  checked against the VT-d rule: {k}");
    }
    assert!(tally.probes >= 10_000);
    assert!(
        tally.disagreements.is_empty(),
        "{} disagreements between vsva's walker and the MMU; the first ones:\n{}",
        tally.disagreements.len(),
        tally.disagreements[..tally.disagreements.len().min(REPORTED)].join("\n")
    );
}

#[allow(clippy::too_many_arguments)]
fn run_probe(
    rng: &mut Rng,
    machine: &mut Machine,
    ram: &HostMemory,
    sc: &Scenario,
    view: &WalkerView<'_>,
    cpu: &CpuFeatures,
    tally: &mut Tally,
    scenario: usize,
) {
    let nonce = rng.next() | 1;
    let access = match rng.below(10) {
        0..=3 => Access::Read,
        4..=6 => Access::Write(nonce),
        _ => Access::Execute,
    };
    let privilege = if rng.percent(50) {
        Privilege::User
    } else {
        Privilege::Supervisor
    };
    let va = probe_address(rng, sc, access == Access::Execute);
    let req = AccessRequest {
        write: matches!(access, Access::Write(_)),
        execute: access == Access::Execute,
        supervisor: privilege == Privilege::Supervisor,
    };
    tally.probes += 1;

    if req.supervisor {
        // VT-d rule: with SRE clear, supervisor requests fault before any entry is read.
        let no_sre = FlConfig {
            sre: false,
            ..sc.cfg
        };
        let mut rec = WalkRecord::default();
        let r = walk_first_level(view, &no_sre, va, req, &mut rec);
        *tally
            .vtd_rule
            .entry("SRE = 0 refuses supervisor requests (SPT.6)")
            .or_default() += 1;
        if !matches!(r, Err(f) if f.reason == FaultReason::Spt6 && f.level == 0)
            || !rec.steps.is_empty()
        {
            tally.disagreements.push(format!(
                "scenario {scenario}: {va:#x} {req:?} with SRE = 0 gave {r:?} after {} steps",
                rec.steps.len()
            ));
        }
    }

    let mut rec = WalkRecord::default();
    let walk = walk_first_level(view, &sc.cfg, va, req, &mut rec);
    // Bait at the byte the walker reached, even when it refused the access, so that a vCPU
    // that goes there anyway shows it.
    let bait = reached(&rec, va).filter(|&pa| pa + 16 <= RAM);
    if let Some(pa) = bait {
        match access {
            Access::Read => ram.write_u64(pa, nonce).expect("bait in RAM"),
            Access::Execute => ram
                .write(pa, &guest::exec_snippet(nonce))
                .expect("bait in RAM"),
            Access::Write(_) => ram.write_u64(pa, 0).expect("bait in RAM"),
        }
    }
    let smep = cpu.smep;
    let probe = Probe {
        cr3: sc.cfg.root,
        mode: paging_mode(sc.cfg.mode),
        write_protect: sc.cfg.wpe,
        smep,
        privilege,
        va,
        access,
    };
    let outcome = machine.probe(&probe).expect("running the probe");
    let landed = bait.map(|pa| ram.read_u64(pa).expect("bait in RAM"));
    if let Some(pa) = bait {
        ram.write(pa, &[0; 16]).expect("bait in RAM");
    }

    let what = match access {
        Access::Read => "read",
        Access::Write(_) => "write",
        Access::Execute => "execute",
    };
    let who = if req.supervisor { "supervisor" } else { "user" };
    let mut problem = None;
    let mut vtd_rule = None;
    let both_succeeded;
    match (&walk, outcome) {
        (Ok(t), cpu_result) => {
            let reached_same = match (access, cpu_result) {
                (Access::Read, Outcome::Read(v)) => v == nonce,
                (Access::Write(_), Outcome::Written) => landed == Some(nonce),
                (Access::Execute, Outcome::Executed(token)) => token == nonce,
                _ => false,
            };
            both_succeeded = reached_same;
            if !reached_same {
                problem = Some(format!(
                    "walker translated to {:#x}, the vCPU gave {cpu_result:?}",
                    t.output
                ));
            }
            tally.count(format!(
                "both allow: {who} {what} of a {:?} page",
                t.page_size
            ));
            if sc.cfg.eafe && reached_same {
                if let Some(s) = rec.steps.iter().find(|s| s.entry & FlPte::EA == 0) {
                    problem = Some(format!(
                        "EAFE: level {} entry {:#x} lacks EA after a successful walk",
                        s.level, s.entry
                    ));
                }
            }
        }
        (Err(f), Outcome::PageFault { error_code, cr2 }) => {
            both_succeeded = false;
            let ours = walker_class(f.reason);
            let theirs = cpu_class(error_code);
            let expected_bits = (if req.write { pf::WRITE } else { 0 })
                | (if req.supervisor { 0 } else { pf::USER })
                | (if req.execute { pf::FETCH } else { 0 });
            let kinds = pf::WRITE | pf::USER | pf::FETCH;
            if ours != Some(theirs) || cr2 != va || error_code & kinds != expected_bits {
                problem = Some(format!(
                    "walker faulted {} at level {} ({ours:?}), the vCPU #PF error code {error_code:#x} ({theirs:?}) CR2 {cr2:#x}",
                    f.reason, f.level
                ));
            }
            tally.count(format!(
                "both fault: {theirs:?} at level {} ({who} {what})",
                f.level
            ));
        }
        (Err(f), cpu_result)
            if !smep
                && f.reason == FaultReason::Sgn3
                && refused_only_as_user_page(&rec, req, va) =>
        {
            both_succeeded = false;
            vtd_rule = Some("supervisor execute of a user page faults (SGN.3), as with SMEP");
            // Without SMEP a CPU runs the page. KVM's PVM backend cannot: it raises #GP on
            // the fetch, which equally shows the walker's rule is the only difference.
            let fine = match cpu_result {
                Outcome::Executed(token) => token == nonce,
                Outcome::Exception {
                    vector: 13,
                    frame: [_, rip],
                } => rip == va,
                _ => false,
            };
            if !fine {
                problem = Some(format!(
                    "a supervisor execute of a user page gave {cpu_result:?} (bait at {bait:x?})"
                ));
            }
        }
        (Err(f), cpu_result) => {
            both_succeeded = false;
            problem = Some(format!(
                "walker faulted {} at level {}, the vCPU gave {cpu_result:?}",
                f.reason, f.level
            ));
        }
    }
    if let Some(rule) = vtd_rule {
        *tally.vtd_rule.entry(rule).or_default() += 1;
    }

    // Accessed/dirty bits: compare every table entry outside the harness, then let the
    // walker's copy follow the vCPU's tables again.
    let ea_mask = if sc.cfg.eafe { !FlPte::EA } else { !0 };
    let mut differences = Vec::new();
    let mut only = [false; 2];
    for &frame in &sc.frames.live {
        let real = read_frame(ram, frame);
        if !sc.harness.contains(&frame) {
            for (i, &theirs) in real.iter().enumerate() {
                let harness_slot = frame == sc.cfg.root && i as u64 == guest::HARNESS_TOP_INDEX;
                let ours = view.entry(frame, i);
                if !harness_slot && (ours ^ theirs) & ea_mask != 0 {
                    only[0] |= ours & !theirs & ea_mask != 0;
                    only[1] |= theirs & !ours & ea_mask != 0;
                    differences.push(format!(
                        "entry {:#x}: walker {ours:#x}, vCPU {theirs:#x}",
                        frame + 8 * i as u64
                    ));
                }
            }
        }
        view.sync(frame);
    }
    if both_succeeded {
        tally.ad_compared += 1;
        if !differences.is_empty() && problem.is_none() {
            problem = Some("accessed/dirty bits differ".into());
        }
    } else {
        for (n, set) in tally.ad_on_fault.iter_mut().zip(only) {
            *n += u64::from(set);
        }
    }

    if let Some(problem) = problem {
        tally.disagreements.push(format!(
            "scenario {scenario} ({:?}, WPE {}, EAFE {}), {who} {what} of {va:#x}: {problem}\n  \
             walker: {walk:?}\n  vCPU: {outcome:?}\n  walk:\n{}  A/D differences: {differences:?}\n  damage: {:?}",
            sc.cfg.mode, sc.cfg.wpe, sc.cfg.eafe, indent(&rec.to_string()), sc.damage
        ));
    }
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}
