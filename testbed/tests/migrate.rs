//! `vsva run migrate-dirty` under other seeds and sizes: every round's harvest is exactly
//! the pages the devices wrote, and the target's RAM equals the source's.

use vsva_testbed::migrate::{migrate_dirty, DirtyHost, MigrateConfig, SmmuDirtyHost};
use vsva_testbed::scenario::Outcome;
use vsva_testbed::stack::Host;

/// Runs the scenario on `host` with `devices` devices for `rounds` rounds and checks its
/// outcome: every round reported, each harvest exactly the pages written, the copy equal
/// to the source.
fn migrate_on(host: &dyn DirtyHost, seed: u64, devices: u8, rounds: usize) {
    let cfg = MigrateConfig {
        ram: 8 << 20,
        devices,
        rounds,
        ops_per_round: 16,
        seed,
    };
    let mut out = Outcome::default();
    migrate_dirty(host, &cfg, &mut out).unwrap();
    assert!(out.passed(), "{}\n{:?}", out.text, out.failed);
    assert!(!out.text.contains("WRONG"), "{}", out.text);
    assert!(out.text.contains("0 pages differ"), "{}", out.text);
    assert_eq!(out.text.matches("round ").count(), rounds, "{}", out.text);
}

#[test]
fn migrate_dirty_reports_exactly_the_written_pages_and_the_copy_matches() {
    for (seed, devices, rounds) in [(1, 1, 3), (2, 3, 4), (3, 2, 8)] {
        let host = Host::new(1 << 30, true).unwrap();
        migrate_on(&host, seed, devices, rounds);
        // Nothing is left on the host: no domain id, no attached device.
        assert_eq!(host.unit.domain_ids_in_use(), 0);
        assert_eq!(host.unit.attached_devices(), 0);
    }
}

/// The same on the SMMUv3 host (`vsva run migrate-dirty --iommu smmuv3`): the HWPT is a
/// stage-1 domain with HA and HD, the harvest reads and cleans its DBM leaves; every
/// round's bitmap is the pages written, the copy equals the source, and nothing is left
/// (no VMID, no owned stream).
#[test]
fn migrate_dirty_on_the_smmu_reports_exactly_the_written_pages() {
    for (seed, devices, rounds) in [(4, 1, 3), (5, 3, 4), (6, 2, 8)] {
        let host = SmmuDirtyHost::new(1 << 30, true).unwrap();
        migrate_on(&host, seed, devices, rounds);
        assert!(host.smmu.vmids().is_empty());
        assert!(host.smmu.owned_streams().is_empty());
    }
}
