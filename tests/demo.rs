//! `vsva demo` as a library call: every check passes, and the counts add up to what the
//! workload does.

use vsva::demo::{run, DemoOptions};

#[test]
fn the_demo_checks_every_byte_and_counts_what_it_did() {
    let opts = DemoOptions {
        seed: 7,
        vms: 2,
        processes: 2,
        bytes: 5 * 4096,
        host_memory: 2 << 30,
        progress: false,
    };
    let mut lines = Vec::new();
    let summary = run(&opts, &mut |l| lines.push(l)).unwrap();
    assert_eq!(summary.errors, 0, "{lines:#?}");
    assert_eq!((summary.vms, summary.pasids), (2, 4));
    // Each lazily mapped buffer of 5 pages takes one page request per page.
    assert_eq!(summary.page_requests_served, 2 * 2 * 5);
    // Copy and fill verify whole buffers; compare verifies up to the changed byte.
    assert!(summary.bytes_verified >= 2 * 2 * 2 * 5 * 4096);
    assert_eq!((summary.stale_translations, summary.leaked_bytes), (0, 0));
    for vm in &summary.per_vm {
        assert_eq!(
            vm.munmap_faults, 2,
            "one faulting DMA after munmap per process"
        );
        assert_eq!(
            vm.cross_vm_refusals,
            2 * 4,
            "bind, invalidate, free and DMA refused"
        );
        assert_eq!(vm.binds, 2);
        assert!(
            vm.invalidations_forwarded >= 2,
            "munmap invalidations reach the host"
        );
    }
    let line = summary.to_string();
    assert!(
        line.starts_with("demo: 2 VMs, 4 PASIDs, ") && line.ends_with(" 0 errors"),
        "{line}"
    );
}

#[test]
fn a_different_seed_moves_different_bytes_and_still_passes() {
    let opts = |seed| DemoOptions {
        seed,
        vms: 1,
        processes: 1,
        bytes: 4096,
        host_memory: 1 << 30,
        progress: false,
    };
    let a = run(&opts(1), &mut |_| ()).unwrap();
    let b = run(&opts(2), &mut |_| ()).unwrap();
    assert_eq!((a.errors, b.errors), (0, 0));
    // The compare step changes a byte at a seeded offset: verified counts differ.
    assert_ne!(a.bytes_verified, b.bytes_verified);
}
