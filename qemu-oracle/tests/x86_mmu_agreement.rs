//! vsva's first-level walker against QEMU's TCG x86-64 MMU (`qemu-system-x86_64 -cpu
//! max`), for what the KVM oracle cannot check where KVM lacks it: 1 GiB pages, 5-level
//! paging (LA57) and SMEP.
//!
//! One run per paging mode (CR4.LA57 cannot change in long mode). Each run builds many
//! random IA-32e tables with vsva's `PageTableBuilder` in the machine's RAM, with the KVM
//! oracle's generator (`vsva_kvm_oracle::tables`): 4 KiB, 2 MiB and 1 GiB pages clustered so that they share
//! tables, random R/W, U/S and XD, random attribute and ignored bits in leaves, and random
//! damage on the way to some mappings (entries made not present, read-only,
//! supervisor-only or execute-disabled at any level, reserved bits, ignored bits). Then
//! probes: a read, write or execute (a call), at CPL 0 or 3, at an address in a mapping,
//! beside one or anywhere. `walk_first_level` walks each over a private copy of the tables,
//! in probe order (its accessed/dirty updates land in the copy as the CPU's land in RAM);
//! QEMU runs them all in one launch, reloading CR3 (a full flush) before each. They must
//! agree:
//!
//! - on success, on the physical byte reached: a read returns the bytes placed at the
//!   walker's output address (a 16-byte slot a probed address, holding a snippet whose
//!   token names the slot), a write is read back there, a call runs that snippet;
//! - on failure, on the #PF: not present (SFL.2) = P clear, reserved (SFL.3) = P and RSVD,
//!   protection (SGN.2/3/6) = P without RSVD; W/R, U/S and I/D as the access; CR2 the
//!   address; and a refused write leaves the slot as it was; or, for the 3 % of addresses
//!   made non-canonical for the paging mode, on SGN.1 before any entry is read = #GP(0);
//! - after a successful access, on every entry of the walk (A, and D in the leaf of a
//!   write).
//!
//! How VT-d's rules map onto the CPU's (VT-d 3.x §3.6.1, §3.6.2): WPE is CR0.WP (random
//! per table); the walker has no switch for the PASID entry's SMEP and NXE fields and acts
//! as with both set (supervisor execute requests to user pages fault; XD is honoured, not
//! reserved), which is CR4.SMEP = 1 (always set here, where the KVM oracle's host has no
//! SMEP) and EFER.NXE = 1; VT-d has no SMAP (CR4.SMAP clear) and no protection keys. SRE has no CPU equivalent: every supervisor probe is also walked
//! with SRE = 0, which must fault SPT.6 before reading an entry. With EAFE (random per
//! table) the walker also sets the extended-accessed bit 10, which the CPU ignores: it is
//! masked in comparisons and required in every entry of a successful walk. The walker runs
//! with FL1GP set (QEMU's CPU has 1 GiB pages) and the CPU's MAXPHYADDR as its address
//! width.
//!
//! Two things QEMU 7.2 (Debian 12) does differently from the SDM are not compared, only
//! counted: it reports a reserved-bit #PF with RSVD set but P clear (the SDM sets P: the
//! entry was present), so the class is taken from RSVD first; and it sets A in a PDPE
//! before it sees PS, so a 1 GiB page whose access then faults has A set (the SDM sets A
//! only in entries the translation used, and the walker sets none in a refused leaf).
//! After a faulting walk the only difference allowed is that one: A set by QEMU alone in a
//! 1 GiB page entry (the KVM oracle does not compare faulting walks at all); every other
//! bit of every entry of the walk must agree, and at the end of each run every entry of
//! every table must equal the walker's copy, except for A in entries where such a
//! difference was counted.
//!
//! Mutation check: with the walker changed to accept bits 29:13 in a 1 GiB page, to let
//! supervisor requests execute user pages, to accept PS in a PML5E, or to leave D clear
//! after a write, this test fails (11, 365, 252 and 2,092 disagreements at the default
//! seed).
//!
//! Set `VSVA_QEMU_ORACLE_SEED` to replay a run with another seed.

#[path = "common/scratch.rs"]
mod scratch;

use scratch::{seed, tempdir};
use std::collections::{BTreeMap, HashMap, HashSet};
use vsva_mem::MemError;
use vsva_mem::PhysMem;

use vm_memory::GuestMemoryMmap;
use vsva_kvm_oracle::tables::{
    cpu_class, level_shift, reached, read_frame, walker_class, FaultClass, Rng, Tables, WalkerView,
};
use vsva_qemu_oracle::x86::{
    exec_snippet, layout, pf, Access, Features, Machine, Outcome, PagingMode, Probe, Report,
    HARNESS_INDEX,
};
use vsva_qemu_oracle::OracleError;
use vsva_vtd::{
    builder::FrameSource, builder::PageTableBuilder, builder::TableFormat, fault::FaultReason,
    flpte::FlFormat, flpte::FlPagingMode, flpte::FlPte, walk::walk_first_level,
    walk::AccessRequest, walk::FlConfig, walk::PageSize, walk::WalkRecord,
};

const SCENARIOS: usize = 60;
const PROBES_PER_SCENARIO: usize = 100;
/// The fewest probes the two runs together must compare.
const MIN_PROBES: usize = 10_000;
/// Frames of 4 KiB and 2 MiB pages.
const SMALL_PAGES: (u64, u64) = (layout::DATA.0, 1 << 30);
/// The frame of 1 GiB pages (RAM is 2 GiB: one GiB-aligned GiB).
const HUGE_PAGE: u64 = 1 << 30;
/// Disagreements described in full before the test fails.
const REPORTED: usize = 12;

/// Table frames: a bump allocator over [`layout::TABLES`] shared by every table of a run.
struct TableFrames {
    next: u64,
}

impl FrameSource for TableFrames {
    fn alloc_table(&mut self) -> Option<u64> {
        (self.next < layout::TABLES.1).then(|| {
            self.next += 4096;
            self.next - 4096
        })
    }

    fn free_table(&mut self, _frame: u64) {}
}

/// The walker's view without its updates: walks that find out where an address leads
/// without setting accessed or dirty bits.
struct DryRun<'a, 'b>(&'a WalkerView<'b, GuestMemoryMmap>);

impl PhysMem for DryRun<'_, '_> {
    fn read_u64(&self, addr: u64) -> Result<u64, MemError> {
        self.0.read_u64(addr)
    }

    fn fetch_or_u64(&self, addr: u64, _bits: u64) -> Result<u64, MemError> {
        self.0.read_u64(addr)
    }

    fn compare_exchange_u64(&self, addr: u64, _old: u64, _new: u64) -> Result<u64, MemError> {
        self.0.read_u64(addr)
    }

    fn write_u64(&self, _addr: u64, _value: u64) -> Result<(), MemError> {
        Ok(())
    }

    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.0.read(addr, buf)
    }

    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), MemError> {
        self.0.write(addr, buf)
    }
}

/// Builds one random table in `machine`'s RAM with vsva's builder.
fn build_scenario(
    rng: &mut Rng,
    machine: &Machine,
    frames: &mut TableFrames,
    format: FlFormat,
) -> Tables {
    let ram = machine.mem();
    let mode = match machine.mode() {
        PagingMode::Level4 => FlPagingMode::FourLevel,
        PagingMode::Level5 => FlPagingMode::FiveLevel,
    };
    let builder = PageTableBuilder::new(TableFormat::FirstLevel(mode), ram, frames).expect("root");
    PhysMem::write_u64(
        ram,
        builder.root() + 8 * HARNESS_INDEX,
        machine.harness_entry(),
    )
    .expect("root in RAM");
    let cfg = FlConfig {
        root: builder.root(),
        mode,
        sre: true,
        wpe: rng.percent(70),
        eafe: rng.percent(30),
        format,
    };
    let mut tables = Tables::new(builder, cfg);
    let levels = mode.levels();
    let usable = move |va: u64| (va >> level_shift(levels)) & 511 != HARNESS_INDEX;
    tables.populate(rng, ram, frames, &usable, |rng, size| match size {
        PageSize::Size1G => HUGE_PAGE,
        _ => {
            let n = (SMALL_PAGES.1 - SMALL_PAGES.0) >> size.shift();
            SMALL_PAGES.0 + (rng.below(n) << size.shift())
        }
    });
    for _ in 0..rng.below(7) {
        tables.damage(rng, ram, false);
    }
    tables
}

/// Whether probes may use `va`: outside the harness's top-level slot.
fn usable(tables: &Tables, va: u64) -> bool {
    tables.top_index(va) != HARNESS_INDEX
}

/// The token of the snippet in the slot at `slot`.
fn token(slot: u64) -> u64 {
    slot ^ 0x5a5a_0000_0000_0000
}

/// The 16-byte slots that probes may reach, as the test filled them.
#[derive(Default)]
struct Slots(HashMap<u64, [u8; 16]>);

impl Slots {
    /// Fills the slot of `pa` (if it is data memory) and returns it.
    fn bait(&mut self, ram: &GuestMemoryMmap, pa: u64) -> Option<u64> {
        let slot = pa & !15;
        if slot < layout::DATA.0 || slot + 16 > layout::DATA.1 {
            return None;
        }
        self.0.entry(slot).or_insert_with(|| {
            let code = exec_snippet(token(slot));
            PhysMem::write(ram, slot, &code).expect("slot in RAM");
            code
        });
        Some(slot)
    }

    /// The 8 bytes at `pa` (8-byte aligned, in a filled slot).
    fn word(&self, pa: u64) -> u64 {
        let s = &self.0[&(pa & !15)];
        let at = (pa & 8) as usize;
        u64::from_le_bytes(s[at..at + 8].try_into().expect("8 bytes"))
    }
}

/// One probe as the walker saw it.
struct Planned {
    scenario: usize,
    va: u64,
    req: AccessRequest,
    access: Access,
    walk: Result<vsva_vtd::walk::Translation, vsva_vtd::walk::WalkFault>,
    rec: WalkRecord,
    /// The reached byte, if it is in a filled slot.
    bait: Option<u64>,
    /// The walk's entries after the walk, in the walker's copy.
    entries: Vec<(u64, u64)>,
}

#[derive(Default)]
struct Tally {
    probes: usize,
    by_result: BTreeMap<String, u64>,
    vtd_rule: BTreeMap<&'static str, u64>,
    ad_compared: u64,
    faults: u64,
    /// Faulting walks after which QEMU alone had set A in a 1 GiB page.
    a_on_fault: u64,
    /// QEMU deviations seen and not compared.
    not_compared: BTreeMap<&'static str, u64>,
    /// Entries where A differed after a faulting walk.
    a_open: HashSet<u64>,
    disagreements: Vec<String>,
}

impl Tally {
    fn count(&mut self, key: String) {
        *self.by_result.entry(key).or_default() += 1;
    }
}

#[test]
fn x86_first_level_walker_agrees_with_qemu() {
    let seed = seed(0x5eed_0086);
    let dir = tempdir("x86");
    let mut tally = Tally::default();
    let mut rng = Rng(seed);
    for mode in [PagingMode::Level4, PagingMode::Level5] {
        let machine = match Machine::new(&dir, mode) {
            Err(OracleError::NoQemu(_)) => {
                eprintln!("SKIPPED: qemu-system-x86_64 is not installed; nothing was checked");
                return;
            }
            m => m.expect("setting up the machine"),
        };
        let features = machine.run(&[]).expect("the empty run").features;
        eprintln!("{mode:?}: seed {seed} (VSVA_QEMU_ORACLE_SEED); cpu max: {features:?}");
        run_mode(&mut rng, &machine, features, &mut tally);
    }
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!(
        "x86-64 oracle: {} probes compared (4- and 5-level paging); A/D compared after {} \
         successful accesses and (all bits but A in 1 GiB pages) after {} faulting walks",
        tally.probes, tally.ad_compared, tally.faults
    );
    for (k, n) in &tally.by_result {
        eprintln!("  {n:6}  {k}");
    }
    for (k, n) in &tally.vtd_rule {
        eprintln!("  {n:6}  checked against the VT-d rule: {k}");
    }
    *tally
        .not_compared
        .entry("A set in a 1 GiB page whose access faulted")
        .or_default() += tally.a_on_fault;
    for (k, n) in &tally.not_compared {
        eprintln!("  {n:6}  QEMU 7.2 deviation, not compared: {k}");
    }
    assert!(tally.probes >= MIN_PROBES, "{} probes", tally.probes);
    assert!(
        tally.disagreements.is_empty(),
        "{} disagreements between vsva's walker and QEMU; the first ones:\n{}",
        tally.disagreements.len(),
        tally.disagreements[..tally.disagreements.len().min(REPORTED)].join("\n")
    );
}

fn run_mode(rng: &mut Rng, machine: &Machine, features: Features, tally: &mut Tally) {
    assert!(
        features.nx() && features.smep() && features.gbpages(),
        "QEMU's max CPU has NX, SMEP and 1 GiB pages: {features:?}"
    );
    if machine.mode() == PagingMode::Level5 {
        assert!(features.la57(), "QEMU's max CPU has LA57: {features:?}");
    }
    let format = FlFormat::new(features.max_phys_bits(), true).expect("address width");
    let ram = machine.mem();
    tally.a_open.clear();
    let mut frames = TableFrames {
        next: layout::TABLES.0,
    };
    let scenarios: Vec<Tables> = (0..SCENARIOS)
        .map(|_| build_scenario(rng, machine, &mut frames, format))
        .collect();
    let view = WalkerView::new(ram, (layout::TABLES.0..frames.next).step_by(4096));
    let mut slots = Slots::default();
    let mut planned = Vec::new();
    let mut probes = Vec::new();
    for (n, sc) in scenarios.iter().enumerate() {
        for _ in 0..PROBES_PER_SCENARIO {
            let nonce = rng.next_u64() | 1;
            let access = match rng.below(10) {
                0..=3 => Access::Read,
                4..=6 => Access::Write(nonce),
                _ => Access::Execute,
            };
            let user = rng.percent(50);
            let req = AccessRequest {
                write: matches!(access, Access::Write(_)),
                execute: access == Access::Execute,
                supervisor: !user,
            };
            // Only addresses whose walk ends outside data memory (in the firmware's top of
            // RAM, through a 1 GiB page) are drawn again.
            // 3 % of the addresses are made non-canonical for the paging mode (one bit from
            // the input width up flipped; with 4-level paging most are canonical with 57
            // bits): SGN.1 before any entry is read, #GP(0) on the CPU.
            let non_canonical = rng.percent(3);
            let va = loop {
                let align = if req.execute { 16 } else { 8 };
                let mut va = sc.probe_address(rng, &|va| usable(sc, va), align);
                if non_canonical {
                    va ^= 1 << rng.in_range(sc.cfg.mode.input_width(), 63);
                }
                let mut rec = WalkRecord::default();
                let _ = walk_first_level(&DryRun(&view), &sc.cfg, va, req, &mut rec);
                match reached(&rec, va) {
                    Some(pa) if !(layout::DATA.0..layout::DATA.1 - 16).contains(&pa) => {}
                    _ => break va,
                }
            };
            if req.supervisor {
                // VT-d rule: with SRE clear, supervisor requests fault before any entry
                // is read. The CPU has no such switch.
                let no_sre = FlConfig {
                    sre: false,
                    ..sc.cfg
                };
                let mut rec = WalkRecord::default();
                let r = walk_first_level(&view, &no_sre, va, req, &mut rec);
                *tally
                    .vtd_rule
                    .entry("SRE = 0 refuses supervisor requests (SPT.6)")
                    .or_default() += 1;
                if !matches!(r, Err(f) if f.reason == FaultReason::Spt6 && f.level == 0)
                    || !rec.steps.is_empty()
                {
                    tally.disagreements.push(format!(
                        "scenario {n}: {va:#x} {req:?} with SRE = 0 gave {r:?} after {} steps",
                        rec.steps.len()
                    ));
                }
            }
            let mut rec = WalkRecord::default();
            let walk = walk_first_level(&view, &sc.cfg, va, req, &mut rec);
            let bait = reached(&rec, va).and_then(|pa| slots.bait(ram, pa).map(|_| pa));
            let entries: Vec<(u64, u64)> = rec
                .steps
                .iter()
                .map(|s| (s.entry_address, view.entry(s.entry_address)))
                .collect();
            let mut entry_addrs = [0; 5];
            for (k, &(a, _)) in entries.iter().enumerate() {
                entry_addrs[k] = a;
            }
            let (check_pa, restore) = match (access, bait) {
                (Access::Write(_), Some(pa)) => (pa, slots.word(pa)),
                _ => (0, 0),
            };
            probes.push(Probe {
                cr3: sc.cfg.root,
                wp: sc.cfg.wpe,
                smep: true,
                user,
                va,
                access,
                check_pa,
                restore,
                entries: entry_addrs,
            });
            planned.push(Planned {
                scenario: n,
                va,
                req,
                access,
                walk,
                rec,
                bait,
                entries,
            });
        }
    }
    let results = machine.run(&probes).expect("the probe run");
    for (p, report) in planned.iter().zip(&results.reports) {
        compare(p, report, &scenarios[p.scenario], &slots, tally);
    }
    // Every entry of every table at the end, as the walker's copy has it.
    let mut differences = Vec::new();
    let harness_slots: HashSet<u64> = scenarios
        .iter()
        .map(|sc| sc.cfg.root + 8 * HARNESS_INDEX)
        .collect();
    for frame in (layout::TABLES.0..frames.next).step_by(4096) {
        let real = read_frame(ram, frame);
        for (i, &theirs) in real.iter().enumerate() {
            let addr = frame + 8 * i as u64;
            if harness_slots.contains(&addr) {
                continue; // the CPU sets A in the harness's entry on every probe
            }
            let ours = view.entry(addr);
            let open = if tally.a_open.contains(&addr) {
                !FlPte::A
            } else {
                !0
            };
            if (ours ^ theirs) & !FlPte::EA & open != 0 {
                differences.push(format!("{addr:#x}: walker {ours:#x}, QEMU {theirs:#x}"));
            }
        }
    }
    if !differences.is_empty() {
        tally.disagreements.push(format!(
            "{:?}: {} table entries differ at the end of the run: {:?}",
            machine.mode(),
            differences.len(),
            &differences[..differences.len().min(REPORTED)]
        ));
    }
}

fn compare(p: &Planned, report: &Report, sc: &Tables, slots: &Slots, tally: &mut Tally) {
    tally.probes += 1;
    let what = match p.access {
        Access::Read => "read",
        Access::Write(_) => "write",
        Access::Execute => "execute",
    };
    let who = if p.req.supervisor {
        "supervisor"
    } else {
        "user"
    };
    let mut problem = None;
    let mut faulted = false;
    let outcome = report.outcome;
    match (&p.walk, outcome) {
        (Ok(t), Outcome::Done(value)) => {
            let reached_same = match (p.access, p.bait) {
                (Access::Read, Some(pa)) => value == slots.word(pa),
                (Access::Write(nonce), Some(_)) => report.check == nonce,
                (Access::Execute, Some(pa)) => value == token(pa & !15),
                (_, None) => false,
            };
            if !reached_same {
                problem = Some(format!(
                    "walker translated to {:#x}, QEMU gave {outcome:?} (read back {:#x})",
                    t.output, report.check
                ));
            }
            if sc.cfg.eafe {
                if let Some(s) = p.rec.steps.iter().find(|s| s.entry & FlPte::EA == 0) {
                    problem = Some(format!(
                        "EAFE: level {} entry {:#x} lacks EA after a successful walk",
                        s.level, s.entry
                    ));
                }
            }
            tally.ad_compared += 1;
            tally.count(format!(
                "both allow: {who} {what} of a {:?} page",
                t.page_size
            ));
        }
        (
            Err(f),
            Outcome::Exception {
                vector: 14,
                error_code,
                cr2,
            },
        ) => {
            faulted = true;
            tally.faults += 1;
            let ours = walker_class(f.reason);
            let theirs = cpu_class(error_code);
            let expected_bits = (if p.req.write { pf::WRITE } else { 0 })
                | (if p.req.supervisor { 0 } else { pf::USER })
                | (if p.req.execute { pf::FETCH } else { 0 });
            let kinds = pf::WRITE | pf::USER | pf::FETCH;
            if ours != Some(theirs) || cr2 != p.va || error_code & kinds != expected_bits {
                problem = Some(format!(
                    "walker faulted {} at level {} ({ours:?}), QEMU #PF error code \
                     {error_code:#x} ({theirs:?}) CR2 {cr2:#x}",
                    f.reason, f.level
                ));
            } else if let (Access::Write(_), Some(pa)) = (p.access, p.bait) {
                if report.check != slots.word(pa) {
                    problem = Some(format!(
                        "a refused write changed {pa:#x} to {:#x}",
                        report.check
                    ));
                }
            }
            if theirs == FaultClass::Reserved && error_code & pf::PRESENT == 0 {
                *tally
                    .not_compared
                    .entry("a reserved-bit #PF with P clear (its P)")
                    .or_default() += 1;
            }
            if f.reason == FaultReason::Sgn3 && p.req.supervisor && p.req.execute {
                *tally
                    .vtd_rule
                    .entry("supervisor execute of a user page faults (SGN.3), as with SMEP")
                    .or_default() += u64::from(problem.is_none());
            }
            tally.count(format!(
                "both fault: {theirs:?} at level {} ({who} {what})",
                f.level
            ));
        }
        (
            Err(f),
            Outcome::Exception {
                vector: 13,
                error_code: 0,
                ..
            },
        ) if f.reason == FaultReason::Sgn1 && f.level == 0 && p.rec.steps.is_empty() => {
            faulted = true;
            tally.faults += 1;
            tally.count(format!(
                "both fault: non-canonical address, SGN.1 / #GP(0) ({who} {what})"
            ));
        }
        (walk, outcome) => {
            problem = Some(format!("walker gave {walk:?}, QEMU {outcome:?}"));
        }
    }
    // The walk's entries after the access: all bits after a success, all but A after a
    // fault.
    let ea_mask = if sc.cfg.eafe { !FlPte::EA } else { !0 };
    let mut differences = Vec::new();
    let mut qemu_only = false;
    for ((&(addr, ours), theirs), step) in p.entries.iter().zip(report.entries).zip(&p.rec.steps) {
        let diff = (ours ^ theirs) & ea_mask;
        // QEMU 7.2's A in a 1 GiB page whose access faulted (see the module comment).
        let gib_leaf = step.level == 3 && theirs & FlPte::PS != 0;
        if faulted && diff == FlPte::A && theirs & FlPte::A != 0 && gib_leaf {
            qemu_only = true;
            tally.a_open.insert(addr);
        } else if diff != 0 {
            differences.push(format!("{addr:#x}: walker {ours:#x}, QEMU {theirs:#x}"));
        }
    }
    tally.a_on_fault += u64::from(qemu_only);
    if !differences.is_empty() && problem.is_none() {
        problem = Some(format!("accessed/dirty bits differ: {differences:?}"));
    }
    if let Some(problem) = problem {
        tally.disagreements.push(format!(
            "scenario {} ({:?}, WPE {}, EAFE {}), {who} {what} of {:#x}: {problem}\n  \
             walker: {:?}\n  QEMU: {outcome:?}\n  walk:\n{}  damage: {:?}",
            p.scenario,
            sc.cfg.mode,
            sc.cfg.wpe,
            sc.cfg.eafe,
            p.va,
            p.walk,
            indent(&p.rec.to_string()),
            sc.damage
        ));
    }
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}
