//! The x86 oracle's harness on its own: QEMU boots it into long mode (4- and 5-level
//! paging) and a handful of hand-made probes do what the architecture says, so that the
//! random comparison (`x86_mmu_agreement`) rests on a harness that is known to work.

// The scratch directory; these probes are hand-made, so `scratch::seed` goes unused here.
#[allow(dead_code)]
#[path = "common/scratch.rs"]
mod scratch;

use scratch::tempdir;
use vm_memory::{Bytes, GuestAddress};
use vsva_qemu_oracle::x86::{
    exec_snippet, layout, pf, Access, Machine, Outcome, PagingMode, Probe, HARNESS_BASE,
    HARNESS_INDEX,
};
use vsva_qemu_oracle::OracleError;

const P: u64 = 1;
const RW: u64 = 2;
const US: u64 = 4;
const XD: u64 = 1 << 63;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;

/// Tables mapping `VA` (a 4 KiB page) at `PAGE` with `leaf_flags`, built by hand: the
/// root, then one table a level.
const VA: u64 = 0x0000_0040_1234_5000;
const PAGE: u64 = layout::DATA.0 + 0x7000;

fn build(m: &Machine, leaf_flags: u64) -> (u64, Vec<u64>) {
    let levels = match m.mode() {
        PagingMode::Level4 => 4,
        PagingMode::Level5 => 5,
    };
    let put = |pa: u64, v: u64| m.mem().write_obj(v, GuestAddress(pa)).unwrap();
    let root = layout::TABLES.0;
    put(root + 8 * HARNESS_INDEX, m.harness_entry());
    let mut entries = Vec::new();
    let mut table = root;
    for level in (1..=levels).rev() {
        let index = (VA >> (12 + 9 * (level - 1))) & 511;
        let slot = table + 8 * index;
        entries.push(slot);
        if level == 1 {
            put(slot, PAGE | leaf_flags);
        } else {
            let next = table + 0x1000;
            put(slot, next | P | RW | US);
            table = next;
        }
    }
    (root, entries)
}

/// The run's header and its first probe records.
fn snapshot(m: &Machine) -> Vec<u8> {
    let mut bytes = vec![0; 0x1000];
    m.mem()
        .read_slice(&mut bytes[..0x800], GuestAddress(layout::HEADER))
        .unwrap();
    m.mem()
        .read_slice(&mut bytes[0x800..], GuestAddress(layout::PROBES))
        .unwrap();
    bytes
}

fn probe(root: u64, user: bool, access: Access, entries: &[u64]) -> Probe {
    let mut e = [0; 5];
    e[..entries.len()].copy_from_slice(entries);
    Probe {
        cr3: root,
        wp: true,
        smep: true,
        user,
        va: VA + 0x40,
        access,
        check_pa: if matches!(access, Access::Write(_)) {
            PAGE + 0x40
        } else {
            0
        },
        restore: 0x5555,
        entries: e,
    }
}

fn boots_and_probes(mode: PagingMode) {
    let dir = tempdir(if mode == PagingMode::Level4 {
        "x86-4"
    } else {
        "x86-5"
    });
    let m = match Machine::new(&dir, mode) {
        Err(OracleError::NoQemu(_)) => {
            eprintln!("SKIPPED: qemu-system-x86_64 is not installed; nothing was checked");
            return;
        }
        m => m.expect("setting up the machine"),
    };
    // An empty run: the harness boots and reports the CPU.
    let features = m.run(&[]).expect("the empty run").features;
    eprintln!("{mode:?}: {features:?}");
    assert!(
        features.nx() && features.smep() && features.gbpages(),
        "{features:?}"
    );
    if mode == PagingMode::Level5 {
        assert!(features.la57(), "QEMU's max CPU has LA57: {features:?}");
    }

    let (root, entries) = build(&m, P | RW | US);
    let leaf = *entries.last().unwrap();
    let mut probes = vec![
        // A supervisor read, a user write, a supervisor fetch of a user page (SMEP), a
        // user fetch (the page is executable).
        probe(root, false, Access::Read, &entries),
        probe(root, true, Access::Write(0xabcd), &entries),
        probe(root, false, Access::Execute, &[]),
        probe(root, true, Access::Execute, &[]),
    ];
    // Not present: an address beside the mapping.
    probes.push(Probe {
        va: VA + 0x1000,
        ..probe(root, false, Access::Read, &[])
    });
    m.mem()
        .write_slice(&exec_snippet(0x77), GuestAddress(PAGE + 0x40))
        .unwrap();
    // The snippet overwrote the value: the read sees its first 8 bytes.
    let first = u64::from_le_bytes(exec_snippet(0x77)[..8].try_into().unwrap());
    let r = m.run(&probes).expect("the probe run");
    assert_eq!(
        r.reports[0].outcome,
        Outcome::Done(first),
        "{:?}",
        r.reports[0]
    );
    // The read set A along the walk, and nothing else.
    for (k, &e) in entries.iter().enumerate() {
        assert_eq!(r.reports[0].entries[k] & (A | D), A, "entry {k} {e:#x}");
    }
    assert!(
        matches!(r.reports[1].outcome, Outcome::Done(_)),
        "{:?}",
        r.reports[1]
    );
    // The user write landed (read back 0xabcd, then restored) and set D in the leaf.
    assert_eq!(r.reports[1].check, 0xabcd);
    assert_eq!(r.reports[1].entries[entries.len() - 1] & (A | D), A | D);
    let smep_fault = r.reports[2].outcome;
    assert!(
        matches!(smep_fault, Outcome::Exception { vector: 14, error_code, cr2 }
            if error_code == pf::PRESENT | pf::FETCH && cr2 == VA + 0x40),
        "{smep_fault:?}"
    );
    // The restore put 0x5555 over the snippet's first 8 bytes: the user fetch runs the
    // bytes there now, which is not the snippet; it must not report the token.
    assert_ne!(r.reports[3].outcome, Outcome::Done(0x77));
    assert!(
        matches!(r.reports[4].outcome, Outcome::Exception { vector: 14, error_code: 0, cr2 }
            if cr2 == VA + 0x1000),
        "{:?}",
        r.reports[4].outcome
    );
    // The CPU's A/D bits are in RAM after the run.
    let leaf_now: u64 = m.mem().read_obj(GuestAddress(leaf)).unwrap();
    assert_eq!(leaf_now & (A | D), A | D);

    // Execute-disable and a user fetch of a fresh snippet; a supervisor write to a
    // read-only page with CR0.WP clear goes through.
    let (root, _) = build(&m, P | US);
    m.mem()
        .write_slice(&exec_snippet(0x99), GuestAddress(PAGE + 0x40))
        .unwrap();
    let no_wp = Probe {
        wp: false,
        ..probe(root, false, Access::Write(0x4242), &[])
    };
    let ro_user = probe(root, true, Access::Write(0x4343), &[]);
    let r = m
        .run(&[probe(root, true, Access::Execute, &[]), no_wp, ro_user])
        .expect("the second run");
    assert_eq!(r.reports[0].outcome, Outcome::Done(0x99));
    assert!(matches!(r.reports[1].outcome, Outcome::Done(_)));
    assert_eq!(r.reports[1].check, 0x4242);
    assert!(
        matches!(r.reports[2].outcome, Outcome::Exception { vector: 14, error_code, .. }
            if error_code == pf::PRESENT | pf::WRITE | pf::USER),
        "{:?}",
        r.reports[2].outcome
    );
    // The refused write did not land: the read-back is the earlier restore value.
    assert_eq!(r.reports[2].check, 0x5555);
    let (root, _) = build(&m, P | US | XD);
    let r = m
        .run(&[probe(root, true, Access::Execute, &[])])
        .expect("the third run");
    assert!(
        matches!(r.reports[0].outcome, Outcome::Exception { vector: 14, error_code, .. }
            if error_code == pf::PRESENT | pf::USER | pf::FETCH),
        "{:?}",
        r.reports[0].outcome
    );

    // Probes the program cannot run are refused before anything is written: the harness's
    // own slot, an unaligned CR3, a read-back address outside RAM, too many probes.
    let fine = probe(root, false, Access::Read, &[]);
    let before = snapshot(&m);
    for (bad, index) in [
        (
            Probe {
                va: HARNESS_BASE,
                ..fine
            },
            1,
        ),
        (
            Probe {
                cr3: root | 8,
                ..fine
            },
            1,
        ),
        (
            Probe {
                check_pa: layout::RAM_SIZE,
                ..fine
            },
            1,
        ),
        (
            Probe {
                entries: [8, 3, 0, 0, 0],
                ..fine
            },
            1,
        ),
    ] {
        let e = m.run(&[fine, bad]).unwrap_err();
        assert!(
            matches!(e, OracleError::BadProbe { index: i, .. } if i == index),
            "{e}"
        );
    }
    let e = m.run(&vec![fine; layout::MAX_PROBES + 1]).unwrap_err();
    assert!(
        matches!(e, OracleError::TooManyProbes { count, max } if count == layout::MAX_PROBES + 1 && max == layout::MAX_PROBES)
    );
    assert!(
        snapshot(&m) == before,
        "a refused run changed the header or the probe records"
    );
    drop(m);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn x86_harness_boots_and_probes_with_4_level_paging() {
    boots_and_probes(PagingMode::Level4);
}

#[test]
fn x86_harness_boots_and_probes_with_5_level_paging() {
    boots_and_probes(PagingMode::Level5);
}
