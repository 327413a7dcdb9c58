//! vsva's stage-2 walker against QEMU's TCG AArch64 MMU at EL2 (the stage-2 harness,
//! `Harness::Stage2`: `-M virt,virtualization=on`, the program at EL2 with its MMU off,
//! each probe an EL1 access with stage 1 off so that its address is the IPA).
//!
//! Each scenario builds one random stage-2 table with `vsva_smmuv3::builder::TableBuilder`: a random
//! granule (VTCR_EL2.TG0 with the STE's S2TG encoding; 16 and 64 KiB where the CPU has them
//! at stage 2), T0SZ 16 to 39 with every SL0 the walker accepts for it (so every start
//! level and concatenated start tables), PS at least the input size (QEMU faults every
//! access of a larger input, a CONSTRAINED UNPREDICTABLE choice the SMMU does not make;
//! 52 bits with 64 KiB where the CPU has FEAT_LPA) and above 42 bits for a 4 KiB level-0
//! or 64 KiB level-1 start, 40 bits for a 16 KiB level-1 start (QEMU 7.2 checks those
//! starts against PS, the Arm ARM's `S2InvalidSL` against the implemented PA size), a random VMID, HA and HD where the CPU
//! has FEAT_HAFDBS; pages, level-2 and level-1 blocks with random S2AP, XN (bit 54), SH,
//! DBM and software bits, some with AF clear; then damage on the way to some mappings
//! (invalid entries, bits 63:59 of table descriptors, which stage 2 ignores, output or
//! table addresses beyond PS, a level-3 entry with `bits[1:0] = 01`, a block at a level the
//! granule has none, bits 51:48, S2AP and AF changed). Probes: LDR, STR and BLR at EL1 at
//! an IPA in a mapping, a random IPA in range or one beyond T0SZ's range (below 2^48: with
//! stage 1 off a larger VA is a stage-1 fault). `walk_stage2` walks each over a model of
//! the memory in probe order (so S2HA/S2HD updates land in the model as QEMU's land in RAM),
//! and they must agree on the byte reached, or on the fault taken to EL2: EC 0x24 (0x20
//! for a fetch), FAR_EL2 the IPA, HPFAR_EL2.FIPA its page, WnR, S1PTW clear, and the
//! DFSC/IFSC class and level; and at the end on every table descriptor.
//!
//! Not compared: as for stage 1, a descriptor with `bits[1:0] = 01` at a level without
//! blocks, which QEMU 7.2 uses as a block (counted, never stored or fetched through);
//! XN[0] (FEAT_XNX, bit 53), which the SMMU's stage 2 has no use for, is never set.
//!
//! The third test turns EL1's stage 1 on over stage 2 and compares `walk_nested` (see its
//! comment).
//!
//! Set `VSVA_QEMU_ORACLE_SEED` to replay a run.

mod common;

use common::scratch::{seed, tempdir};
use common::{
    class, damage_mappings, data_pa, dfsc, features, in_data, machine, mapping_input, mapping_size,
    pick_granule, probe_input, probe_offset, report, with_chances, write_nonces, Batch, Expect,
    Frames, DEFAULT_SEED, IPS,
};
use std::collections::BTreeMap;
use vm_memory::{Bytes, GuestAddress};
use vsva_kvm_oracle::tables::Rng;
use vsva_mem::PhysMem;
use vsva_qemu_oracle::layout::{DATA, PROGRAM_BYTES, S2_STUB, TABLES, VECTORS};
use vsva_qemu_oracle::{
    el2::S2_STUB_IPA, fetch_snippet, tcr_tg0, Harness, OracleError, Outcome, Probe, ProbeOp,
    TCR_EPD1,
};
use vsva_smmuv3::{
    builder::TableBuilder, ste::Granule, walk::walk_nested, walk::walk_stage2, walk::AccessRequest,
    walk::AddressSize, walk::FaultClass, walk::FaultStage, walk::PageSize, walk::S1Config,
    walk::S1Flags, walk::S1Table, walk::S2Config, walk::S2Flags, walk::WalkRecord,
};

const SCENARIOS: usize = 60;
const MAPPINGS_PER_SCENARIO: usize = 12;
const PROBES_PER_SCENARIO: usize = 170;
/// The fewest probes a run may compare (issue 10: at least 10,000).
const MIN_PROBES: usize = 10_000;
/// Stage-2 leaf attributes every mapping has: MemAttr Normal write-back (0b1111).
const MEMATTR_WB: u64 = 0xf << 2;
/// Bit 54 of a stage-2 leaf: XN (XN[1] with FEAT_XNX).
const XN: u64 = 1 << 54;

/// A random stage-2 leaf's optional bits and the chance of each: AF, bit 51, XN.
const S2_OPTIONAL: [(u64, u64); 3] = [(1 << 10, 85), (1 << 51, 40), (XN, 25)];

/// VTCR_EL2: T0SZ, SL0, TG0 (the S2TG encoding), PS, HA, HD; IRGN0/ORGN0 write-back,
/// inner shareable, RES1 bit 31.
const fn vtcr(t0sz: u64, sl0: u64, tg0: u64, ps: u64, ha: bool, hd: bool) -> u64 {
    t0sz | (sl0 << 6)
        | (1 << 8)
        | (1 << 10)
        | (3 << 12)
        | (tg0 << 14)
        | (ps << 16)
        | ((ha as u64) << 21)
        | ((hd as u64) << 22)
        | (1 << 31)
}

/// A stage-2 page or block: Normal write-back MemAttr, inner shareable, `s2ap`, AF.
const fn s2_leaf(pa: u64, s2ap: u64, af: bool) -> u64 {
    pa | 3 | MEMATTR_WB | (s2ap << 6) | (3 << 8) | ((af as u64) << 10)
}

/// `cfg` as a walk that changes nothing and ignores AF sees it, with an SMMU OAS of `oas`:
/// where a probe would land.
fn dry_s2(cfg: &S2Config, oas: AddressSize, lpa: bool) -> S2Config {
    let sl0 = match (cfg.granule(), cfg.start_level()) {
        (Granule::Size4K, l) => 2 - l,
        (_, l) => 3 - l,
    };
    let flags = S2Flags {
        affd: true,
        ..S2Flags::default()
    };
    S2Config::with_granule(cfg.root(), cfg.t0sz(), sl0, cfg.granule(), oas, lpa, flags)
        .expect("the scenario's own configuration")
}

/// The harness alone, on a hand-built stage-2 table: loads, a store, a fetch and each fault
/// class with known answers.
#[test]
fn stage2_harness_runs_a_hand_built_table() {
    let dir = tempdir("s2hand");
    let Some(machine) = machine(&dir) else {
        return;
    };
    let mem = machine.mem();
    let w = |pa: u64, v: u64| mem.write_obj(v, GuestAddress(pa)).unwrap();
    // T0SZ 32, SL0 1: a level-1 start table at TABLES.0, a level-2 and a level-3 table.
    let (l1, l2, l3) = (TABLES.0, TABLES.0 + 0x1000, TABLES.0 + 0x2000);
    w(l1, l2 | 3);
    w(l2, l3 | 3);
    w(l3 + 8 * (S2_STUB_IPA >> 12), s2_leaf(S2_STUB, 1, true));
    w(l3 + 8, s2_leaf(DATA.0, 3, true));
    w(l3 + 16, s2_leaf(DATA.0 + 0x1000, 1, true));
    w(l3 + 24, s2_leaf(DATA.0 + 0x2000, 3, true) | XN);
    w(l3 + 32, s2_leaf(DATA.0 + 0x3000, 3, false));
    w(DATA.0 + 0x10, 0x1234_5678);
    w(DATA.0 + 0x1008, 0x55);
    mem.write_slice(&fetch_snippet(0x42), GuestAddress(DATA.0 + 0x30))
        .unwrap();
    mem.write_slice(&fetch_snippet(0x43), GuestAddress(DATA.0 + 0x2030))
        .unwrap();
    let image = machine.snapshot().unwrap();
    let probe = |op, va, check_pa| Probe {
        op,
        va,
        value: 0xabcd,
        check_pa,
    };
    let probes = [
        Probe {
            op: ProbeOp::Stage2Switch,
            va: l1 | (5 << 48),
            value: vtcr(32, 1, 0, 0, false, false),
            check_pa: 0,
        },
        probe(ProbeOp::Load, 0x1010, 0),
        probe(ProbeOp::Store, 0x1018, DATA.0 + 0x18),
        probe(ProbeOp::Store, 0x2008, 0),
        probe(ProbeOp::Load, 0x2008, 0),
        probe(ProbeOp::Fetch, 0x1030, 0),
        probe(ProbeOp::Fetch, 0x3030, 0),
        probe(ProbeOp::Load, 0x4000, 0),
        probe(ProbeOp::Load, 0x5000, 0),
        probe(ProbeOp::Load, 0x4000_0000, 0),
        probe(ProbeOp::Load, 1 << 33, 0),
    ];
    // Ops of the other harnesses are refused before QEMU starts, and the reverse.
    for (harness, bad) in [
        (Harness::Stage2, ProbeOp::LoadUnprivileged),
        (Harness::Stage2, ProbeOp::FetchUnprivileged),
        (Harness::Upper, ProbeOp::Stage2Switch),
        (Harness::Identity, ProbeOp::Stage2Switch),
    ] {
        let e = machine
            .run(&image, &[probes[0], probe(bad, 0x1000, 0)], harness)
            .unwrap_err();
        assert!(
            matches!(e, OracleError::BadProbe { index: 1, .. })
                || matches!(e, OracleError::BadProbe { index: 0, .. } if harness != Harness::Stage2),
            "{harness:?} {bad:?}: {e}"
        );
    }
    let r = machine.run(&image, &probes, Harness::Stage2).unwrap();
    assert_eq!(r.features.current_el, 2 << 2, "the harness starts at EL2");
    assert_eq!(r.outcomes[1], Outcome::Done(0x1234_5678));
    assert_eq!(r.outcomes[2], Outcome::Done(0xabcd));
    let abort = |i: usize| match r.outcomes[i] {
        Outcome::Abort(a) => (a.ec(), a.dfsc(), a.wnr(), a.far, a.hpfar),
        o => panic!("probe {i}: {o:?}"),
    };
    // A store to a read-only page: Permission fault, level 3, from a lower EL.
    assert_eq!(abort(3), (0x24, 0b001111, true, 0x2008, 0x20));
    // Reads of it are allowed.
    assert_eq!(r.outcomes[4], Outcome::Done(0x55));
    assert_eq!(r.outcomes[5], Outcome::Done(0x42));
    // XN: an Instruction Abort from a lower EL, Permission fault, level 3.
    assert_eq!(abort(6), (0x20, 0b001111, false, 0x3030, 0x30));
    // AF clear: Access flag fault, level 3; no page: Translation fault, level 3; no level-1
    // entry: level 1; an IPA beyond T0SZ's 32 bits: level 0.
    assert_eq!(abort(7), (0x24, 0b001011, false, 0x4000, 0x40));
    assert_eq!(abort(8), (0x24, 0b000111, false, 0x5000, 0x50));
    assert_eq!(abort(9), (0x24, 0b000101, false, 0x4000_0000, 0x40_0000));
    assert_eq!(abort(10), (0x24, 0b000100, false, 1 << 33, 1 << 25));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A stage-2 configuration: a granule of `granules` (weighted), T0SZ and an SL0 the walker
/// accepts, PS, and HA/HD where `hafdbs` allows; with the PS encoding.
fn pick_s2(
    rng: &mut Rng,
    granules: &[(Granule, u64)],
    lpa: bool,
    hafdbs: u64,
) -> (Granule, u8, u8, u64, AddressSize, S2Flags) {
    let granule = pick_granule(rng, granules);
    // T0SZ and an SL0 the walker accepts for it.
    let (t0sz, sl0) = loop {
        let t0sz = rng.in_range(16, 39) as u8;
        let sl0s: Vec<u8> = (0..=2)
            .filter(|&sl0| {
                S2Config::with_granule(
                    0,
                    t0sz,
                    sl0,
                    granule,
                    AddressSize::Bits48,
                    lpa,
                    S2Flags::default(),
                )
                .is_ok()
            })
            .collect();
        if !sl0s.is_empty() {
            break (t0sz, rng.pick(&sl0s));
        }
    };
    let input_bits = 64 - u32::from(t0sz);
    // QEMU 7.2 checks a level-0 start (4 KiB) or level-1 start (16 and 64 KiB) against
    // PS where the Arm ARM (S2InvalidSL) checks the implemented PA size: those starts
    // get a PS above the size QEMU refuses.
    let start = match granule {
        Granule::Size4K => 2 - sl0,
        _ => 3 - sl0,
    };
    let min_ps = match (granule, start) {
        (Granule::Size4K, 0) | (Granule::Size64K, 1) => 43,
        (Granule::Size16K, 1) => 41,
        _ => 0,
    };
    let ps_choices: Vec<_> = IPS
        .iter()
        .copied()
        .filter(|(_, size)| {
            size.bits() >= input_bits.max(min_ps)
                && (size.bits() < 52 || (granule == Granule::Size64K && lpa))
        })
        .collect();
    let (ps_code, ps) = rng.pick(&ps_choices);
    let ha = hafdbs >= 1 && rng.percent(50);
    let hd = ha && hafdbs >= 2 && rng.percent(60);
    let flags = S2Flags {
        ha,
        hd,
        ..S2Flags::default()
    };
    (granule, t0sz, sl0, ps_code, ps, flags)
}

#[test]
fn aarch64_stage2_walker_agrees_with_qemu_at_el2() {
    let seed = seed(DEFAULT_SEED);
    let dir = tempdir("s2");
    let Some(machine) = machine(&dir) else {
        return;
    };
    // A first run with no probe reports the CPU's features.
    let features = features(&machine, Harness::Stage2);
    assert_eq!(features.current_el, 2 << 2, "the harness starts at EL2");
    let hafdbs = features.hafdbs();
    let lpa = features.pa_range() >= 6;
    // ID_AA64MMFR0_EL1.TGran4_2, TGran64_2, TGran16_2: 0 as at stage 1, 1 none.
    let at_stage2 = |shift: u32, stage1: bool| match (features.mmfr0 >> shift) & 0xf {
        0 => stage1,
        1 => false,
        _ => true,
    };
    let mut granules = Vec::new();
    if at_stage2(40, true) {
        granules.push((Granule::Size4K, 5));
    }
    if at_stage2(32, features.gran16k()) {
        granules.push((Granule::Size16K, 3));
    }
    if at_stage2(36, features.gran64k()) {
        granules.push((Granule::Size64K, 2));
    }
    println!(
        "seed {seed} (VSVA_QEMU_ORACLE_SEED); cpu max at EL2: ID_AA64MMFR0_EL1 {:#x} \
         (PARange {}, stage-2 granules {:?}), HAFDBS {hafdbs}",
        features.mmfr0,
        features.pa_range(),
        granules.iter().map(|g| g.0).collect::<Vec<_>>(),
    );
    let mut rng = Rng(seed);
    let mem = machine.mem();
    write_nonces(mem);
    let mut frames = Frames::new();
    let mut granule_counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut start_counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut size_counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut damage: BTreeMap<&str, usize> = BTreeMap::new();
    let mut scenarios = Vec::new();
    for _ in 0..SCENARIOS {
        let (granule, t0sz, sl0, ps_code, ps, flags) = pick_s2(&mut rng, &granules, lpa, hafdbs);
        let frame_bytes = 1u64 << granule.shift();
        let input_bits = 64 - u32::from(t0sz);
        let probe_cfg =
            S2Config::with_granule(0, t0sz, sl0, granule, ps, lpa, flags).expect("a checked SL0");
        let start_bytes = probe_cfg.concatenated_tables() * frame_bytes;
        let Some(root) = frames.alloc(start_bytes) else {
            break;
        };
        mem.write_slice(&vec![0; start_bytes as usize], GuestAddress(root))
            .unwrap();
        let cfg = S2Config::with_granule(root, t0sz, sl0, granule, ps, lpa, flags)
            .expect("a checked SL0");
        *granule_counts.entry(format!("{granule:?}")).or_default() += 1;
        *start_counts
            .entry(format!(
                "level {} x{}",
                cfg.start_level(),
                cfg.concatenated_tables()
            ))
            .or_default() += 1;
        let input_mask = (1u64 << input_bits) - 1;
        let mut builder = TableBuilder::stage2(&cfg);
        let mut alloc = || frames.alloc(frame_bytes);
        // The program's 64 KiB at IPA 0, read-only: the EL1 stub runs there.
        let page = PageSize::of(granule, 3, lpa).expect("every granule has pages");
        for at in (0..PROGRAM_BYTES).step_by(page.bytes() as usize) {
            builder
                .map(
                    mem,
                    &mut alloc,
                    at,
                    VECTORS + at,
                    page,
                    MEMATTR_WB | (1 << 6) | (3 << 8) | (1 << 10),
                )
                .expect("mapping the program");
        }
        let mut mappings: Vec<(u64, PageSize, u64)> = Vec::new();
        for _ in 0..MAPPINGS_PER_SCENARIO {
            let size = mapping_size(&mut rng, granule, lpa);
            let ipa = mapping_input(&mut rng, mappings.last().map(|m| m.0), input_mask, size);
            if ipa < PROGRAM_BYTES {
                continue;
            }
            let pa = data_pa(&mut rng, size);
            let attrs = MEMATTR_WB | (rng.below(4) << 6) | (rng.pick(&[0, 2, 3]) << 8);
            let mut attrs = with_chances(&mut rng, attrs, &S2_OPTIONAL);
            if rng.percent(20) {
                attrs |= rng.below(16) << 55;
            }
            if builder.map(mem, &mut alloc, ipa, pa, size, attrs).is_ok() {
                mappings.push((ipa, size, pa));
                *size_counts.entry(format!("{size:?}")).or_default() += 1;
            }
        }
        // Damage on the way to some mappings, never on the way to the program.
        let oa52 = cfg.format().oa52();
        let spared = |level, slot| {
            (0..PROGRAM_BYTES)
                .step_by(page.bytes() as usize)
                .any(|at| builder.descriptor_address(mem, at, level) == Ok(Some(slot)))
        };
        let start = cfg.start_level();
        damage_mappings(
            &mut rng,
            mem,
            &builder,
            &mappings,
            start,
            spared,
            &mut damage,
            |rng, d, level, leaf| match rng.below(7) {
                0 => ("invalid", d & !1),
                1 if !leaf => (
                    "table bits 63:59 (ignored at stage 2)",
                    d | (rng.below(31) + 1) << 59,
                ),
                2 if ps.bits() < 48 => {
                    ("address beyond PS", d | (1 << rng.in_range(ps.bits(), 47)))
                }
                3 if level == 3 => ("level-3 bits[1:0] = 01", d & !2),
                3 if PageSize::of(granule, level, lpa).is_none() => {
                    ("block where the granule has none", d & !2)
                }
                4 if !oa52 => ("bits 51:48 (DBM, RES0) set", d | (rng.below(15) + 1) << 48),
                _ => (
                    "S2AP and AF changed",
                    d ^ (rng.below(4) << 6) ^ (rng.below(2) << 10),
                ),
            },
        );
        let vmid = rng.below(256);
        let vtcr = vtcr(
            u64::from(t0sz),
            u64::from(sl0),
            granule.raw(),
            ps_code,
            flags.ha,
            flags.hd,
        );
        scenarios.push((cfg, (vmid << 48) | root, vtcr, mappings));
    }
    let mut image = machine.snapshot().unwrap();
    let mut batch = Batch::new();
    for (cfg, vttbr, vtcr, mappings) in &scenarios {
        batch.switch(ProbeOp::Stage2Switch, *vttbr, *vtcr, *cfg);
        let input_bits = cfg.input_bits();
        // A walk that changes nothing and ignores AF finds where a probe would land.
        let oas = if cfg.output_bits() > 48 {
            AddressSize::Bits52
        } else {
            AddressSize::Bits48
        };
        let dry = dry_s2(cfg, oas, lpa);
        let mut made = 0;
        while made < PROBES_PER_SCENARIO {
            let in_mapping = |rng: &mut Rng| in_data(rng, mappings);
            let mapped = !mappings.is_empty();
            let Some(ipa) = probe_input(&mut rng, mapped, in_mapping, input_bits, 48) else {
                continue;
            };
            let op = rng.pick(&[ProbeOp::Load, ProbeOp::Store, ProbeOp::Fetch]);
            let fetch = op == ProbeOp::Fetch;
            let ipa = probe_offset(&mut rng, ipa, fetch);
            let access = AccessRequest {
                write: op.is_store(),
                instruction: fetch,
                privileged: true,
            };
            // Where it lands if S2AP lets it (a fetch needs only XN clear).
            let reached = walk_stage2(mem, &dry, ipa, access, &mut ());
            if let Ok(t) = reached {
                if !(DATA.0..DATA.1).contains(&t.output) {
                    continue;
                }
            }
            let mut record = WalkRecord::default();
            let walk = walk_stage2(mem, cfg, ipa, access, &mut record);
            if let Ok(t) = walk {
                if !(DATA.0..DATA.1).contains(&t.output) {
                    // The dry walk did not see a dirty-state grant: undo it, skip the probe.
                    if let Some(s) = record.steps.last() {
                        mem.write_u64(s.entry_address, s.entry).unwrap();
                    }
                    continue;
                }
            }
            if !batch.push(mem, &mut image, (op, ipa), (*cfg, walk, record), reached) {
                continue;
            }
            made += 1;
        }
    }

    let (results, elapsed) = batch.run(&machine, &image, Harness::Stage2);

    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for e in &batch.expect {
        *counts.entry(class(e)).or_default() += 1;
    }
    let mut failures = batch.disagreements(
        mem,
        &results.outcomes,
        |p, _, f, a| {
            a.ec() == if p.op == ProbeOp::Fetch { 0x20 } else { 0x24 }
                && a.far == p.va
                && a.hpfar == (p.va >> 12) << 4
                && a.wnr() == p.op.is_store()
                && !a.s1ptw()
                && dfsc(f) == Some(a.dfsc())
        },
        |p, cfg, e, got| {
            format!(
                "{:?} ipa {:#x} ({:?}, T0SZ {}, start level {}, PS {} bits, {:?}): \
                 walker {e:?}, QEMU {got:x?}",
                p.op,
                p.va,
                cfg.granule(),
                cfg.t0sz(),
                cfg.start_level(),
                cfg.output_bits(),
                cfg.flags(),
            )
        },
    );
    let updates = batch.compare_tables(mem, &image, &results.tables, &mut failures);
    let compared = batch.probes.len() - scenarios.len();
    println!(
        "stage 2 at EL2: {compared} probes in {} scenarios, one QEMU run of {elapsed:?}; \
         {updates} descriptors updated by S2HA/S2HD",
        scenarios.len()
    );
    println!(
        "granules: {granule_counts:?}; start tables: {start_counts:?}; mappings: {size_counts:?}"
    );
    println!("damage: {damage:?}");
    println!(
        "scenarios with HA {}, HD {}",
        scenarios.iter().filter(|s| s.0.flags().ha).count(),
        scenarios.iter().filter(|s| s.0.flags().hd).count()
    );
    println!(
        "probes of blocks where the granule has none: {} where QEMU faulted as the Arm ARM \
         says, {} where it used the block (not compared)",
        batch.invalid_blocks.get(&true).unwrap_or(&0),
        batch.invalid_blocks.get(&false).unwrap_or(&0)
    );
    for (c, n) in &counts {
        println!("  {n:6}  {c}");
    }
    assert!(
        compared >= MIN_PROBES,
        "only {compared} probes were compared (at least {MIN_PROBES} must be)"
    );
    assert!(
        ["F_PERMISSION", "F_TRANSLATION", "F_ACCESS", "F_ADDR_SIZE"]
            .iter()
            .all(|k| counts.keys().any(|c| c.starts_with(k)))
            && counts.contains_key("load reached the walker's output")
            && counts.contains_key("store reached the walker's output")
            && counts.contains_key("fetch ran the code at the walker's output"),
        "the run did not exercise loads, stores, fetches and every fault class: {counts:?}"
    );
    report(&failures, "walk_stage2 and QEMU at EL2", seed);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Nested scenarios and probes per scenario: the tables of both stages share the table
/// frames.
const NESTED_SCENARIOS: usize = 40;
const NESTED_PROBES_PER_SCENARIO: usize = 250;
/// The fewest nested probes a run may compare.
const NESTED_MIN_PROBES: usize = 5_000;

/// Nested translation at EL1 over EL2's stage 2 against `walk_nested`: each scenario a
/// random stage-2 table (as above) and a random stage-1 table in IPA space (its frames
/// identity-mapped by stage 2, read/write), EL1's stage 1 on. A probe's VA goes through
/// stage 1 (every table read through stage 2) and its IPA through stage 2. A stage-1 fault
/// is taken to EL1 (EC 0x25, 0x21 for a fetch; FAR_EL1 the VA); a stage-2 fault to EL2
/// (EC 0x24 or 0x20, FAR_EL2 the VA, HPFAR_EL2 the IPA's page) with S1PTW set when stage 2
/// refused a stage-1 table access (WnR is then not compared).
#[test]
fn aarch64_nested_walker_agrees_with_qemu_at_el2() {
    let seed = seed(DEFAULT_SEED);
    let dir = tempdir("nested");
    let Some(machine) = machine(&dir) else {
        return;
    };
    let features = features(&machine, Harness::Stage2);
    let hafdbs = features.hafdbs();
    let lpa = features.pa_range() >= 6;
    let mut s2_granules = vec![(Granule::Size4K, 5)];
    let mut s1_granules = vec![(Granule::Size4K, 5)];
    if features.gran16k() {
        s2_granules.push((Granule::Size16K, 3));
        s1_granules.push((Granule::Size16K, 3));
    }
    if features.gran64k() {
        s2_granules.push((Granule::Size64K, 2));
        s1_granules.push((Granule::Size64K, 2));
    }
    let mut rng = Rng(seed ^ 0x4e57);
    let mem = machine.mem();
    write_nonces(mem);
    let mut frames = Frames::new();
    let mut damage: BTreeMap<&str, usize> = BTreeMap::new();
    let mut scenarios = Vec::new();
    'scenarios: for _ in 0..NESTED_SCENARIOS {
        // Stage 2's input range holds the table frames (below 2^31): T0SZ at most 33.
        let (g2, t0sz2, sl0, ps_code, ps, flags2) = loop {
            let c = pick_s2(&mut rng, &s2_granules, lpa, hafdbs);
            if c.1 <= 33 {
                break c;
            }
        };
        let page2 = PageSize::of(g2, 3, lpa).expect("every granule has pages");
        let input2 = 64 - u32::from(t0sz2);
        // The stage-2 data mappings, placed once stage 1's frames are mapped.
        let mut planned: Vec<(u64, PageSize, u64)> = Vec::new();
        for _ in 0..MAPPINGS_PER_SCENARIO {
            let size = mapping_size(&mut rng, g2, lpa);
            let ipa = rng.next_u64() & ((1u64 << input2) - 1) & !(size.bytes() - 1);
            if ipa < PROGRAM_BYTES {
                continue;
            }
            let pa = data_pa(&mut rng, size);
            planned.push((ipa, size, pa));
        }
        // Stage 1: a table in IPA space; VA 0 maps the program's 64 KiB read-only.
        let g1 = pick_granule(&mut rng, &s1_granules);
        let frame1 = 1u64 << g1.shift();
        let t0sz1 = rng.in_range(16, 39) as u8;
        let (ips_code, ips) = rng.pick(&IPS[..6]);
        let ha1 = hafdbs >= 1 && rng.percent(50);
        let hd1 = ha1 && hafdbs >= 2 && rng.percent(60);
        let Some(root1) = frames.alloc(frame1) else {
            break;
        };
        mem.write_slice(&vec![0; frame1 as usize], GuestAddress(root1))
            .unwrap();
        let s1 = S1Config::with_tables(
            S1Table::ttb0(root1, t0sz1, g1).unwrap(),
            None,
            ips,
            lpa,
            S1Flags {
                ha: ha1,
                hd: hd1,
                ..S1Flags::default()
            },
        );
        let mut b1 = TableBuilder::stage1(&s1);
        let mut frames1 = vec![root1];
        let page1 = PageSize::of(g1, 3, lpa).expect("every granule has pages");
        {
            let mut alloc = || {
                let f = frames.alloc(frame1);
                frames1.extend(f);
                f
            };
            for at in (0..PROGRAM_BYTES).step_by(page1.bytes() as usize) {
                if b1
                    .map(
                        mem,
                        &mut alloc,
                        at,
                        at,
                        page1,
                        (2 << 6) | (3 << 8) | (1 << 10),
                    )
                    .is_err()
                {
                    break 'scenarios;
                }
            }
        }
        let input1_mask = (1u64 << s1.input_bits()) - 1;
        let mut mappings1: Vec<(u64, PageSize, u64)> = Vec::new();
        for _ in 0..MAPPINGS_PER_SCENARIO {
            let size = mapping_size(&mut rng, g1, lpa);
            let va = rng.next_u64() & input1_mask & !(size.bytes() - 1);
            if va < PROGRAM_BYTES {
                continue;
            }
            // Mostly into a stage-2 mapping, else anywhere.
            let ipa = match (rng.percent(85), planned.is_empty()) {
                (true, false) => {
                    let (ipa2, size2, _) = rng.pick(&planned);
                    (ipa2 + rng.below(size2.bytes())) & !(size.bytes() - 1)
                }
                _ => rng.next_u64() & ((1u64 << input2) - 1) & !(size.bytes() - 1),
            };
            let attrs = (rng.below(4) << 6) | (rng.pick(&[0, 2, 3]) << 8);
            let optional = [(10, 85), (51, 40), (53, 25), (54, 25)];
            let attrs = with_chances(&mut rng, attrs, &optional.map(|(b, p)| (1 << b, p)));
            let mut alloc = || {
                let f = frames.alloc(frame1);
                frames1.extend(f);
                f
            };
            if b1.map(mem, &mut alloc, va, ipa, size, attrs).is_ok() {
                mappings1.push((va, size, ipa));
            }
        }
        // Stage 2: the stage-1 frames (identity, read/write), the program at IPA 0, then
        // the data mappings.
        let probe_cfg =
            S2Config::with_granule(0, t0sz2, sl0, g2, ps, lpa, flags2).expect("a checked SL0");
        let frame2 = 1u64 << g2.shift();
        let start_bytes = probe_cfg.concatenated_tables() * frame2;
        let Some(root2) = frames.alloc(start_bytes) else {
            break;
        };
        mem.write_slice(&vec![0; start_bytes as usize], GuestAddress(root2))
            .unwrap();
        let s2 =
            S2Config::with_granule(root2, t0sz2, sl0, g2, ps, lpa, flags2).expect("a checked SL0");
        let mut b2 = TableBuilder::stage2(&s2);
        let mut alloc2 = || frames.alloc(frame2);
        // IPAs stage 1 needs: its frames and the program.
        let mut protected: Vec<u64> = (0..PROGRAM_BYTES).step_by(page2.bytes() as usize).collect();
        for &f in &frames1 {
            let first = f & !(page2.bytes() - 1);
            for ipa in (first..f + frame1).step_by(page2.bytes() as usize) {
                if !protected.contains(&ipa) {
                    protected.push(ipa);
                }
            }
        }
        for &ipa in &protected {
            let (pa, attrs) = if ipa < PROGRAM_BYTES {
                (VECTORS + ipa, MEMATTR_WB | (1 << 6) | (3 << 8) | (1 << 10))
            } else {
                (ipa, MEMATTR_WB | (3 << 6) | (3 << 8) | (1 << 10))
            };
            if b2.map(mem, &mut alloc2, ipa, pa, page2, attrs).is_err() {
                // Out of frames.
                break 'scenarios;
            }
        }
        let mut mappings2 = Vec::new();
        for &(ipa, size, pa) in &planned {
            let attrs = MEMATTR_WB | (rng.below(4) << 6) | (rng.pick(&[0, 2, 3]) << 8);
            let attrs = with_chances(&mut rng, attrs, &S2_OPTIONAL);
            if b2.map(mem, &mut alloc2, ipa, pa, size, attrs).is_ok() {
                mappings2.push((ipa, size, pa));
            }
        }
        // Damage: leaves of both stages (never what the program and stage 1's tables need).
        for &(va, size, _) in &mappings1 {
            if !rng.percent(25) {
                continue;
            }
            let Ok(Some(slot)) = b1.descriptor_address(mem, va, size.level()) else {
                continue;
            };
            let Ok(d) = mem.read_u64(slot) else { continue };
            let (what, new) = match rng.below(3) {
                0 => ("stage-1 leaf invalid", d & !1),
                1 if ips.bits() < 48 => (
                    "stage-1 output beyond IPS",
                    d | (1 << rng.in_range(ips.bits(), 47)),
                ),
                _ => (
                    "stage-1 AP and AF changed",
                    d ^ (rng.below(4) << 6) ^ (rng.below(2) << 10),
                ),
            };
            *damage.entry(what).or_default() += 1;
            mem.write_u64(slot, new).unwrap();
        }
        for &(ipa, size, _) in &mappings2 {
            if !rng.percent(25) {
                continue;
            }
            let Ok(Some(slot)) = b2.descriptor_address(mem, ipa, size.level()) else {
                continue;
            };
            if protected
                .iter()
                .any(|&p| b2.descriptor_address(mem, p, size.level()) == Ok(Some(slot)))
            {
                continue;
            }
            let Ok(d) = mem.read_u64(slot) else { continue };
            let (what, new) = match rng.below(3) {
                0 => ("stage-2 leaf invalid", d & !1),
                1 if ps.bits() < 48 => (
                    "stage-2 output beyond PS",
                    d | (1 << rng.in_range(ps.bits(), 47)),
                ),
                _ => (
                    "stage-2 S2AP and AF changed",
                    d ^ (rng.below(4) << 6) ^ (rng.below(2) << 10),
                ),
            };
            *damage.entry(what).or_default() += 1;
            mem.write_u64(slot, new).unwrap();
        }
        // Stage 2's view of some stage-1 tables, not those the stub's walk reads: a stage-2
        // fault on a stage-1 table access (S1PTW).
        let mut stub_frames = Vec::new();
        for at in (0..PROGRAM_BYTES).step_by(page1.bytes() as usize) {
            for level in s1.start_level()..=3 {
                if let Ok(Some(slot)) = b1.descriptor_address(mem, at, level) {
                    stub_frames.push(slot & !(frame1 - 1));
                }
            }
        }
        for &f in &frames1 {
            let page = f & !(page2.bytes() - 1);
            let shares = |g: &u64| *g < page + page2.bytes() && page < *g + frame1;
            if stub_frames.iter().any(shares) || !rng.percent(30) {
                continue;
            }
            for ipa in (page..f + frame1).step_by(page2.bytes() as usize) {
                let Ok(Some(slot)) = b2.descriptor_address(mem, ipa, page2.level()) else {
                    continue;
                };
                let Ok(d) = mem.read_u64(slot) else { continue };
                let (what, new) = match rng.below(4) {
                    0 => ("stage-1 table unmapped at stage 2", d & !1),
                    1 => ("stage-1 table unreadable at stage 2", d & !(3 << 6)),
                    2 => ("stage-1 table read-only at stage 2", d & !(2 << 6)),
                    _ => ("stage-1 table AF clear at stage 2", d & !(1 << 10)),
                };
                *damage.entry(what).or_default() += 1;
                mem.write_u64(slot, new).unwrap();
            }
        }
        let vtcr = vtcr(
            u64::from(t0sz2),
            u64::from(sl0),
            g2.raw(),
            ps_code,
            flags2.ha,
            flags2.hd,
        );
        let tcr = vsva_qemu_oracle::tcr(t0sz1, ips_code, ha1, hd1) | tcr_tg0(g1.raw()) | TCR_EPD1;
        let vmid = rng.below(256);
        scenarios.push((s1, s2, (vmid << 48) | root2, vtcr, tcr, mappings1));
    }
    let mut image = machine.snapshot().unwrap();
    let mut batch = Batch::new();
    for (s1, s2, vttbr, vtcr, tcr, mappings1) in &scenarios {
        batch.switch(ProbeOp::Stage2Switch, *vttbr, *vtcr, *s1);
        batch.switch(ProbeOp::Stage1Switch { enable: true }, s1.root(), *tcr, *s1);
        let input_bits = s1.input_bits();
        let dry1 = S1Config::with_tables(
            *s1.ttb0(),
            None,
            AddressSize::Bits48,
            lpa,
            S1Flags {
                affd: true,
                ..S1Flags::default()
            },
        );
        let dry2 = dry_s2(s2, AddressSize::Bits48, lpa);
        let mut made = 0;
        while made < NESTED_PROBES_PER_SCENARIO {
            let in_mapping = |rng: &mut Rng| {
                let (base, size, _) = rng.pick(mappings1);
                base + rng.below(size.bytes() / 8) * 8
            };
            let mapped = !mappings1.is_empty();
            let Some(va) = probe_input(&mut rng, mapped, in_mapping, input_bits, 48) else {
                continue;
            };
            if va < PROGRAM_BYTES {
                continue;
            }
            let op = rng.pick(&[ProbeOp::Load, ProbeOp::Store, ProbeOp::Fetch]);
            let fetch = op == ProbeOp::Fetch;
            let va = probe_offset(&mut rng, va, fetch);
            let access = AccessRequest {
                write: op.is_store(),
                instruction: fetch,
                privileged: true,
            };
            let reached = walk_nested(mem, &dry1, &dry2, va, access, &mut ());
            if let Ok(t) = reached {
                if !(DATA.0..DATA.1).contains(&t.output) {
                    continue;
                }
            }
            let mut record = WalkRecord::default();
            let walk = walk_nested(mem, s1, s2, va, access, &mut record);
            if let Ok(t) = walk {
                if !(DATA.0..DATA.1).contains(&t.output) {
                    // Undo the walk's updates; skip the probe.
                    for s in record.steps.iter().rev() {
                        if s.set_bits | s.cleared_bits != 0 {
                            mem.write_u64(s.entry_address, s.entry).unwrap();
                        }
                    }
                    continue;
                }
            }
            if !batch.push(mem, &mut image, (op, va), (*s1, walk, record), reached) {
                continue;
            }
            made += 1;
        }
    }

    let (results, elapsed) = batch.run(&machine, &image, Harness::Stage2);
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for e in &batch.expect {
        let key = match e {
            Expect::Fault(f) => match f.stage {
                FaultStage::Stage1 => format!("stage 1: {}", class(e)),
                FaultStage::Stage2 { class: c, .. } => format!("stage 2 ({c:?}): {}", class(e)),
            },
            _ => class(e),
        };
        *counts.entry(key).or_default() += 1;
    }
    // Stage-2 faults on stage-1 table accesses: whether QEMU gave the stage-2 level.
    let mut s1ptw_levels: BTreeMap<bool, usize> = BTreeMap::new();
    let mut failures = batch.disagreements(
        mem,
        &results.outcomes,
        |p, _, f, a| {
            let fetch = p.op == ProbeOp::Fetch;
            let same_level = dfsc(f) == Some(a.dfsc());
            let common = a.far == p.va && dfsc(f).map(|d| d & !3) == Some(a.dfsc() & !3);
            match f.stage {
                FaultStage::Stage1 => {
                    common
                        && same_level
                        && a.ec() == if fetch { 0x21 } else { 0x25 }
                        && a.wnr() == p.op.is_store()
                }
                FaultStage::Stage2 { class: c, ipa } => {
                    let s1ptw = c == FaultClass::Tt;
                    // QEMU 7.2 gives a stage-2 fault on a stage-1 table access the stage-1
                    // lookup's level; the Arm ARM the stage-2 walk's.
                    if s1ptw {
                        *s1ptw_levels.entry(same_level).or_default() += 1;
                    }
                    common
                        && (same_level || s1ptw)
                        && a.ec() == if fetch { 0x20 } else { 0x24 }
                        && a.hpfar == (ipa >> 12) << 4
                        && a.s1ptw() == s1ptw
                        && (s1ptw || a.wnr() == p.op.is_store())
                }
            }
        },
        |p, s1, e, got| {
            format!(
                "{:?} va {:#x} (stage 1 {:?} T0SZ {}, {:?}): walker {e:?}, QEMU {got:x?}",
                p.op,
                p.va,
                s1.ttb0().granule(),
                s1.t0sz(),
                s1.flags(),
            )
        },
    );
    let updates = batch.compare_tables(mem, &image, &results.tables, &mut failures);
    let compared = batch.probes.len() - 2 * scenarios.len();
    println!(
        "nested at EL1 over stage 2: {compared} probes in {} scenarios, one QEMU run of \
         {elapsed:?}; {updates} descriptors updated by HA/HD; damage {damage:?}",
        scenarios.len()
    );
    for (c, n) in &counts {
        println!("  {n:6}  {c}");
    }
    println!(
        "stage-2 faults on stage-1 table accesses: {} with the stage-2 level (Arm ARM), {} \
         with another (QEMU 7.2's stage-1 level; the level is not compared)",
        s1ptw_levels.get(&true).unwrap_or(&0),
        s1ptw_levels.get(&false).unwrap_or(&0)
    );
    assert!(
        compared >= NESTED_MIN_PROBES,
        "only {compared} nested probes were compared (at least {NESTED_MIN_PROBES} must be)"
    );
    assert!(
        counts.keys().any(|c| c.starts_with("stage 1: F_"))
            && counts.keys().any(|c| c.starts_with("stage 2 (Tt)"))
            && counts.keys().any(|c| c.starts_with("stage 2 (In)"))
            && counts.contains_key("load reached the walker's output")
            && counts.contains_key("store reached the walker's output")
            && counts.contains_key("fetch ran the code at the walker's output"),
        "the run did not exercise both stages' faults and every access: {counts:?}"
    );
    report(&failures, "walk_nested and QEMU", seed);
    let _ = std::fs::remove_dir_all(&dir);
}
