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

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use vsva_mem::PhysMem;

use vsva_hw::memory::HostMemory;
use vsva_kvm_oracle::tables::{
    cpu_class, level_shift, map_flags, reached, read_frame, walker_class, Rng, Tables, WalkerView,
};
use vsva_kvm_oracle::{
    guest, pf, Access, CpuFeatures, Machine, OracleError, Outcome, PagingMode, Privilege, Probe,
};
use vsva_vtd::walk::WalkStep;
use vsva_vtd::{
    builder::FrameSource, builder::PageTableBuilder, builder::TableFormat, fault::FaultReason,
    flpte::FlFormat, flpte::FlPagingMode, flpte::FlPte, walk::walk_first_level,
    walk::AccessRequest, walk::FlConfig, walk::PageSize, walk::WalkRecord,
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
/// Disagreements described in full before the test fails.
const REPORTED: usize = 12;

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

/// One random page table and the VT-d configuration it is walked with.
struct Scenario {
    tables: Tables,
    frames: TableFrames,
    /// Frames holding only harness tables.
    harness: HashSet<u64>,
}

impl std::ops::Deref for Scenario {
    type Target = Tables;

    fn deref(&self) -> &Tables {
        &self.tables
    }
}

/// Whether probes and mappings may use `va` in `mode`: outside the harness's top-level
/// slot and outside the hypervisor hole.
fn usable(mode: FlPagingMode, va: u64) -> bool {
    (va >> level_shift(mode.levels())) & 511 != guest::HARNESS_TOP_INDEX
        && !guest::hypervisor_hole(paging_mode(mode)).contains(&va)
}

fn paging_mode(mode: FlPagingMode) -> PagingMode {
    match mode {
        FlPagingMode::FourLevel => PagingMode::Level4,
        FlPagingMode::FiveLevel => PagingMode::Level5,
    }
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
    let mut tables = Tables::new(builder, cfg);
    tables.populate(
        rng,
        ram,
        &mut frames,
        &|va| usable(mode, va),
        |rng, size| match size {
            PageSize::Size1G => {
                HUGE_PAGES.0 + (rng.below((HUGE_PAGES.1 - HUGE_PAGES.0) >> 30) << 30)
            }
            _ => {
                let n = (SMALL_PAGES.1 - SMALL_PAGES.0) >> size.shift();
                SMALL_PAGES.0 + (rng.below(n) << size.shift())
            }
        },
    );
    for _ in 0..rng.below(7) {
        tables.damage(rng, ram, cpu.amd);
    }
    Scenario {
        tables,
        frames,
        harness,
    }
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
        let view = WalkerView::new(&*ram, sc.frames.live.iter().copied());
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
            tables, mut frames, ..
        } = sc;
        tables.builder.destroy(&mut frames);
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
    view: &WalkerView<'_, HostMemory>,
    cpu: &CpuFeatures,
    tally: &mut Tally,
    scenario: usize,
) {
    let nonce = rng.next_u64() | 1;
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
    // Data accesses are 8 bytes and never cross a page; the execute snippet needs 16.
    let align = if access == Access::Execute {
        guest::EXEC_SNIPPET_LEN as u64
    } else {
        8
    };
    let va = sc.probe_address(rng, &|va| usable(sc.cfg.mode, va), align);
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
                let ours = view.entry(frame + 8 * i as u64);
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
