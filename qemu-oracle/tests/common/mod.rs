//! What the AArch64 oracle tests share: the machine (skipped where QEMU is missing), the
//! data nonces, the table frames, the IPS encodings, the fault syndrome of a walker fault,
//! a scratch directory, and the probe driver [`Batch`]: the walker's expectation of each
//! probe, the snippets fetches run, the run in QEMU and the comparison of its outcomes
//! and of the final tables. Each test keeps its own scenarios, fault checks and report.
//! Their seeded generator is the x86 oracles' one, `vsva_kvm_oracle::tables::Rng`; the
//! scratch directory and the seed are every QEMU oracle test's ([`scratch`]).

pub mod scratch;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};
use vsva_kvm_oracle::tables::Rng;
use vsva_mem::PhysMem;
use vsva_qemu_oracle::layout::{DATA, IMAGE_BASE, TABLES};
use vsva_qemu_oracle::{
    fetch_snippet, Abort, Features, Harness, Machine, OracleError, Outcome, Probe, ProbeOp, Results,
};
use vsva_smmuv3::{
    builder::TableBuilder, ste::Granule, walk::AddressSize, walk::FaultKind, walk::PageSize,
    walk::StepOutcome, walk::Translation, walk::WalkFault, walk::WalkRecord,
};

/// Disagreements described in full before a test fails.
const REPORTED: usize = 12;

/// The AArch64 machine in `dir`, or `None` (said on stderr) where `qemu-system-aarch64` is
/// not installed.
pub fn machine(dir: &Path) -> Option<Machine> {
    match Machine::new(dir) {
        Err(OracleError::NoQemu(_)) => {
            eprintln!("SKIPPED: qemu-system-aarch64 is not installed; nothing was checked");
            None
        }
        m => Some(m.expect("setting up the machine")),
    }
}

/// The CPU's features, from a first run of `harness` with no probe.
pub fn features(machine: &Machine, harness: Harness) -> Features {
    machine
        .run(&machine.snapshot().unwrap(), &[], harness)
        .expect("running the empty program")
        .features
}

/// Fills the data region with its nonces.
pub fn write_nonces<M: PhysMem + ?Sized>(mem: &M) {
    let data: Vec<u8> = (DATA.0..DATA.1)
        .step_by(8)
        .flat_map(|pa| nonce(pa).to_le_bytes())
        .collect();
    mem.write(DATA.0, &data).unwrap();
}

/// Table frames in the table region, each aligned to its size.
pub struct Frames(u64);

impl Frames {
    /// The whole table region free.
    pub fn new() -> Self {
        Frames(TABLES.0)
    }

    /// A frame of `bytes`, if the region has room.
    pub fn alloc(&mut self, bytes: u64) -> Option<u64> {
        let at = self.0.next_multiple_of(bytes);
        (at + bytes <= TABLES.1).then(|| {
            self.0 = at + bytes;
            at
        })
    }
}

/// One of `granules`, drawn by its weight (4 KiB if the list is empty).
pub fn pick_granule(rng: &mut Rng, granules: &[(Granule, u64)]) -> Granule {
    let weights: u64 = granules.iter().map(|g| g.1).sum();
    let mut roll = rng.below(weights);
    granules
        .iter()
        .find(|g| {
            let hit = roll < g.1;
            roll = roll.saturating_sub(g.1);
            hit
        })
        .map_or(Granule::Size4K, |g| g.0)
}

/// The level a random mapping asks for: 3 (60 %), 2 (25 %) or 1.
pub fn mapping_level(rng: &mut Rng) -> u8 {
    match rng.below(100) {
        0..=59 => 3,
        60..=84 => 2,
        _ => 1,
    }
}

/// The size of a random mapping with `granule`: the page or block of a random level
/// ([`mapping_level`]), a level-2 block where the granule has no block at that level.
pub fn mapping_size(rng: &mut Rng, granule: Granule, lpa: bool) -> PageSize {
    let level = mapping_level(rng);
    PageSize::of(granule, level, lpa)
        .or(PageSize::of(granule, 2, lpa))
        .or(PageSize::of(granule, 3, lpa))
        .expect("every granule has pages")
}

/// A random input address of a mapping of `size` under `mask`: near the previous mapping's
/// `last` (60 % of the time, to share tables), else anywhere.
pub fn mapping_input(rng: &mut Rng, last: Option<u64>, mask: u64, size: PageSize) -> u64 {
    let near = last.filter(|_| rng.percent(60));
    let input = match near {
        Some(v) => v ^ (rng.next_u64() & ((1 << 31) - 1)),
        None => rng.next_u64(),
    };
    input & mask & !(size.bytes() - 1)
}

/// `attrs` with each of `optional`'s bits set at its percentage.
pub fn with_chances(rng: &mut Rng, attrs: u64, optional: &[(u64, u64)]) -> u64 {
    optional.iter().fold(
        attrs,
        |a, &(bits, p)| if rng.percent(p) { a | bits } else { a },
    )
}

/// Damages the descriptor on the way to some of `mappings` (input address, size, output
/// address) at a [`damage_site`]: `choose` says what becomes of descriptor `d` at `level`
/// (a leaf when `leaf`), and its name, counted in `damage`.
#[allow(clippy::too_many_arguments)]
pub fn damage_mappings<M: PhysMem + ?Sized>(
    rng: &mut Rng,
    mem: &M,
    builder: &TableBuilder,
    mappings: &[(u64, PageSize, u64)],
    start: u8,
    spared: impl Fn(u8, u64) -> bool,
    damage: &mut BTreeMap<&'static str, usize>,
    choose: impl Fn(&mut Rng, u64, u8, bool) -> (&'static str, u64),
) {
    for &(input, size, _) in mappings {
        let Some((slot, d, level)) = damage_site(rng, mem, builder, (input, size), start, &spared)
        else {
            continue;
        };
        let (what, new) = choose(rng, d, level, level == size.level());
        *damage.entry(what).or_default() += 1;
        mem.write_u64(slot, new).unwrap();
    }
}

/// A probe's input address: in a mapping (`in_mapping`, 75 %), anywhere under
/// `input_bits` (15 %), or with one bit set between `input_bits` and `top` (out of range;
/// `None` when there is no such bit).
pub fn probe_input(
    rng: &mut Rng,
    mapped: bool,
    in_mapping: impl FnOnce(&mut Rng) -> u64,
    input_bits: u32,
    top: u32,
) -> Option<u64> {
    let mask = (1u64 << input_bits) - 1;
    match (rng.below(100), mapped) {
        (0..=74, true) => Some(in_mapping(rng)),
        (75..=89, _) | (_, false) => Some(rng.next_u64() & mask & !7),
        _ if input_bits < top => {
            Some((rng.next_u64() & mask & !7) | (1 << rng.in_range(input_bits, top - 1)))
        }
        _ => None,
    }
}

/// Where in its 64-byte line a probe of `addr` goes: a fetch runs the stub at offset 48;
/// a load or store uses one of the six data words.
pub fn probe_offset(rng: &mut Rng, addr: u64, fetch: bool) -> u64 {
    if fetch {
        (addr & !63) | 48
    } else {
        (addr & !63) | (rng.below(6) * 8)
    }
}

/// The output address of a random mapping of `size`: inside the data region when it fits
/// there, else the block holding the region's start.
pub fn data_pa(rng: &mut Rng, size: PageSize) -> u64 {
    if size.bytes() <= (DATA.1 - DATA.0) / 2 {
        let first = DATA.0.next_multiple_of(size.bytes());
        first + rng.below((DATA.1 - first) / size.bytes()) * size.bytes()
    } else {
        DATA.0 & !(size.bytes() - 1)
    }
}

/// A random 8-byte-aligned input address in one of `mappings` (input address, size,
/// output address) whose output lands in the data region.
pub fn in_data(rng: &mut Rng, mappings: &[(u64, PageSize, u64)]) -> u64 {
    let (base, size, pa) = rng.pick(mappings);
    let lo = DATA.0.max(pa);
    let hi = DATA.1.min(pa + size.bytes());
    base + (lo - pa) + rng.below((hi - lo) / 8) * 8
}

/// The nonce a data word holds before any store: its own address, marked.
pub fn nonce(pa: u64) -> u64 {
    pa ^ 0xd47a_0000_0000_0000
}

/// The IPS (TCR_EL1, CD) and PS (VTCR_EL2, STE.S2PS) encodings and their sizes.
pub const IPS: [(u64, AddressSize); 7] = [
    (0, AddressSize::Bits32),
    (1, AddressSize::Bits36),
    (2, AddressSize::Bits40),
    (3, AddressSize::Bits42),
    (4, AddressSize::Bits44),
    (5, AddressSize::Bits48),
    (6, AddressSize::Bits52),
];

/// The walker's fault as the DFSC a CPU reports (Arm ARM D17.2, ESR_ELx ISS for a Data Abort).
pub fn dfsc(f: &WalkFault) -> Option<u64> {
    let base = match f.kind {
        FaultKind::AddrSize => 0b00_0000,
        FaultKind::Translation => 0b00_0100,
        FaultKind::Access => 0b00_1000,
        FaultKind::Permission => 0b00_1100,
        FaultKind::WalkEabt => return None,
    };
    Some(base | u64::from(f.level))
}

/// The seed an AArch64 run without `VSVA_QEMU_ORACLE_SEED` uses: the same probes in every
/// CI run, so that a result does not depend on when the test ran.
pub const DEFAULT_SEED: u64 = 0x05ee_da64;

/// Where random damage goes on the way to the mapping at `va` of `size` (30 % of
/// mappings): the present descriptor `builder` placed at a random level from `start` to
/// the mapping's, unless `spared` (given its level and address) keeps it from harm.
/// Returns its address, the descriptor and its level.
pub fn damage_site<M: PhysMem + ?Sized>(
    rng: &mut Rng,
    mem: &M,
    builder: &TableBuilder,
    (va, size): (u64, PageSize),
    start: u8,
    spared: impl Fn(u8, u64) -> bool,
) -> Option<(u64, u64, u8)> {
    if !rng.percent(30) {
        return None;
    }
    let level = rng.in_range(u32::from(start), u32::from(size.level())) as u8;
    let slot = builder.descriptor_address(mem, va, level).ok()??;
    if spared(level, slot) {
        return None;
    }
    // A table address damaged beyond the output size (or RAM) leads nowhere.
    let d = mem.read_u64(slot).ok()?;
    (d & 1 != 0).then_some((slot, d, level))
}

/// What the walker expects of one probe.
#[derive(Clone, Debug)]
pub enum Expect {
    Switch,
    Load(u64),
    Store(u64),
    Fetch(u32),
    Fault(WalkFault),
}

/// The class a probe is counted in.
pub fn class(e: &Expect) -> String {
    match e {
        Expect::Switch => "scenario switch".into(),
        Expect::Load(_) => "load reached the walker's output".into(),
        Expect::Store(_) => "store reached the walker's output".into(),
        Expect::Fetch(_) => "fetch ran the code at the walker's output".into(),
        Expect::Fault(f) => format!("{} level {}", f.kind, f.level),
    }
}

/// The address of the block descriptor at a level its granule has no blocks that ended
/// `record`'s walk (a Translation fault for the walker), if one did.
///
/// QEMU releases before its `lpae_block_desc_valid` check (Debian 12's 7.2 among them)
/// use such a descriptor as a block: no store or fetch goes through one, the outcome of a
/// load is only counted, and the Access flag QEMU may set in it is not compared.
pub fn invalid_block(record: &WalkRecord) -> Option<u64> {
    record
        .steps
        .last()
        .filter(|s| {
            s.level < 3
                && s.entry & 3 == 1
                && s.outcome == StepOutcome::Fault(FaultKind::Translation)
        })
        .map(|s| s.entry_address)
}

/// One batch of probes for one QEMU run: each probe with the walker's expectation and the
/// walk it made over the model memory, in probe order, with `C` the configuration it was
/// walked with.
pub struct Batch<C> {
    pub probes: Vec<Probe>,
    pub expect: Vec<Expect>,
    pub records: Vec<(C, WalkRecord)>,
    /// The tag of the snippet at each output address a fetch reaches.
    snippets: BTreeMap<u64, u32>,
    /// Block descriptors at levels without blocks that probes reached.
    invalid_block_slots: BTreeSet<u64>,
    /// Probes of blocks at levels without blocks: whether QEMU reported the Arm ARM's
    /// Translation fault.
    pub invalid_blocks: BTreeMap<bool, usize>,
}

impl<C: Copy> Batch<C> {
    pub fn new() -> Self {
        Batch {
            probes: Vec::new(),
            expect: Vec::new(),
            records: Vec::new(),
            snippets: BTreeMap::new(),
            invalid_block_slots: BTreeSet::new(),
            invalid_blocks: BTreeMap::new(),
        }
    }

    /// Adds a switch of the scenario walked with `cfg`.
    pub fn switch(&mut self, op: ProbeOp, va: u64, value: u64, cfg: C) {
        self.probes.push(Probe {
            op,
            va,
            value,
            check_pa: 0,
        });
        self.expect.push(Expect::Switch);
        self.records.push((cfg, WalkRecord::default()));
    }

    /// Adds the probe `op` at `va` that the walker walked with `cfg` (`walk`, `record`):
    /// a store writes its value at the walker's output in `mem`, and any fetch that
    /// reaches memory (`reached`, the walk that changes nothing) finds its snippet there,
    /// in `mem` and in `image`, whatever the walker says. Returns false, adding nothing,
    /// for a store or fetch through a block at a level without blocks.
    pub fn push<M: PhysMem + ?Sized>(
        &mut self,
        mem: &M,
        image: &mut [u8],
        (op, va): (ProbeOp, u64),
        (cfg, walk, record): (C, Result<Translation, WalkFault>, WalkRecord),
        reached: Result<Translation, WalkFault>,
    ) -> bool {
        let fetch = matches!(op, ProbeOp::Fetch | ProbeOp::FetchUnprivileged);
        if let Some(at) = invalid_block(&record) {
            if op.is_store() || fetch {
                return false;
            }
            self.invalid_block_slots.insert(at);
        }
        let value = 0x5354_0000_0000_0000 | self.probes.len() as u64;
        let tag = 0x5e00_0000 | self.probes.len() as u32;
        let (e, check_pa) = match walk {
            Ok(t) if op.is_store() => {
                mem.write_u64(t.output, value).unwrap();
                (Expect::Store(t.output), t.output)
            }
            Ok(t) if fetch => (
                Expect::Fetch(*self.snippets.entry(t.output).or_insert(tag)),
                0,
            ),
            Ok(t) => (Expect::Load(mem.read_u64(t.output).unwrap()), 0),
            Err(f) => (Expect::Fault(f), 0),
        };
        if let (true, Ok(t)) = (fetch, reached) {
            let code = fetch_snippet(*self.snippets.entry(t.output).or_insert(tag));
            mem.write(t.output, &code).unwrap();
            let at = (t.output - IMAGE_BASE) as usize;
            image[at..at + code.len()].copy_from_slice(&code);
        }
        self.probes.push(Probe {
            op,
            va,
            value,
            check_pa,
        });
        self.expect.push(e);
        self.records.push((cfg, record));
        true
    }

    /// Runs the batch in one QEMU launch of `image` with `harness`; and how long it took.
    pub fn run(&self, machine: &Machine, image: &[u8], harness: Harness) -> (Results, Duration) {
        let start = Instant::now();
        let results = machine
            .run(image, &self.probes, harness)
            .expect("running the probes");
        (results, start.elapsed())
    }

    /// The probes whose outcome in `outcomes` disagrees with the walker, each told as
    /// `describe` tells its probe, its configuration, the walker's expectation and QEMU's
    /// outcome, then the walk: a switch, load, store or fetch must have its value (a
    /// store's found at its output in `mem`), a fault an abort that `fault` accepts (given
    /// the probe and its configuration); a probe of a block at a level without blocks only
    /// needs the walker's Translation fault (QEMU's answer is counted).
    pub fn disagreements<M: PhysMem + ?Sized>(
        &mut self,
        mem: &M,
        outcomes: &[Outcome],
        mut fault: impl FnMut(&Probe, &C, &WalkFault, &Abort) -> bool,
        describe: impl Fn(&Probe, &C, &Expect, &Outcome) -> String,
    ) -> Vec<String> {
        let mut bad = Vec::new();
        for (i, ((p, e), got)) in self
            .probes
            .iter()
            .zip(&self.expect)
            .zip(outcomes)
            .enumerate()
        {
            let ok = match (e, got) {
                (Expect::Fault(f), got) if invalid_block(&self.records[i].1).is_some() => {
                    let fixed =
                        matches!(got, Outcome::Abort(a) if a.dfsc() == dfsc(f).unwrap_or(0));
                    *self.invalid_blocks.entry(fixed).or_default() += 1;
                    f.kind == FaultKind::Translation
                }
                (Expect::Switch, Outcome::Done(_)) => true,
                (Expect::Load(v), Outcome::Done(g)) => v == g,
                (Expect::Store(pa), Outcome::Done(g)) => mem.read_u64(*pa).unwrap() == *g,
                (Expect::Fetch(tag), Outcome::Done(g)) => u64::from(*tag) == *g,
                (Expect::Fault(f), Outcome::Abort(a)) => fault(p, &self.records[i].0, f, a),
                _ => false,
            };
            if !ok {
                let (cfg, record) = &self.records[i];
                bad.push(format!("probe {i}: {}\n{record}", describe(p, cfg, e, got)));
            }
        }
        bad
    }

    /// Compares every table descriptor QEMU left (`tables`, the table region) with the
    /// walker's in `mem`, but those of blocks at levels without blocks, adding each
    /// difference to `failures`; returns how many descriptors the walker changed from
    /// `image`.
    pub fn compare_tables<M: PhysMem + ?Sized>(
        &self,
        mem: &M,
        image: &[u8],
        tables: &[u8],
        failures: &mut Vec<String>,
    ) -> usize {
        let mut updates = 0;
        for (k, chunk) in tables.chunks_exact(8).enumerate() {
            let pa = TABLES.0 + 8 * k as u64;
            if self.invalid_block_slots.contains(&pa) {
                continue;
            }
            let cpu = u64::from_le_bytes(chunk.try_into().unwrap());
            let model = mem.read_u64(pa).unwrap();
            let before =
                u64::from_le_bytes(image[(pa - IMAGE_BASE) as usize..][..8].try_into().unwrap());
            if model != before {
                updates += 1;
            }
            if cpu != model {
                failures.push(format!(
                    "descriptor at {pa:#x}: was {before:#018x}, QEMU left {cpu:#018x}, the walker {model:#018x}"
                ));
            }
        }
        updates
    }
}

/// Fails with the first [`REPORTED`] of `failures` described, if there are any, naming
/// `what` disagreed and the seed that replays the run.
pub fn report(failures: &[String], what: &str, seed: u64) {
    if !failures.is_empty() {
        for f in failures.iter().take(REPORTED) {
            eprintln!("{f}");
        }
        panic!(
            "{} disagreements between {what} (seed {seed})",
            failures.len()
        );
    }
}
