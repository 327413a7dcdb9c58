//! The demo on an SMMUv3 host: every check passes, and the counts are what the options
//! ask for.

use vsva_testbed::demo::DemoOptions;
use vsva_testbed::smmu_demo;
use vsva_testbed::stack::Uapi;

fn opts(vms: usize, processes: usize) -> DemoOptions {
    DemoOptions {
        seed: 7,
        vms,
        processes,
        bytes: 3 * 4096 + 100,
        progress: false,
        ..DemoOptions::default()
    }
}

#[test]
fn two_arm64_vms_pass_every_check() {
    let mut lines = Vec::new();
    let s = smmu_demo::run(&opts(2, 2), &mut |l| lines.push(l)).unwrap();
    assert_eq!(s.errors, 0, "{lines:?}");
    assert_eq!((s.vms, s.pasids), (2, 4));
    assert!(s.cross_vm_checked);
    // Per process: copy, fill and two compares of 4 pages, and 256 bytes paged in.
    assert_eq!(s.bytes_verified, 4 * (4 * 4 * 4096 + 256));
    assert_eq!(s.page_requests_served, 4);
    assert_eq!(s.stale_translations, 0);
    for r in &s.per_vm {
        assert_eq!(r.pasids, [1, 2], "SubstreamIDs are per device, from 1");
        assert_eq!(r.munmap_faults, 2);
        assert_eq!(r.cross_vm_refusals, 2);
        assert_eq!(r.binds, 1, "one CD table per device");
        assert!(
            r.invalidations_forwarded >= 2 * 2,
            "munmap's TLBI and ATC_INV"
        );
        assert_eq!(r.host_errors, 0);
    }
    assert_eq!(
        s.to_string(),
        format!(
            "demo (smmuv3): 2 VMs, 4 PASIDs, {} bytes verified, 4 page requests served, {} invalidations forwarded, 0 errors",
            s.bytes_verified, s.invalidations_forwarded
        )
    );
}

#[test]
fn one_vm_skips_the_cross_vm_checks() {
    let s = smmu_demo::run(&opts(1, 1), &mut |_| {}).unwrap();
    assert_eq!(s.errors, 0);
    assert!(!s.cross_vm_checked);
    assert!(s
        .to_string()
        .ends_with("; cross-VM checks skipped (they need --vms 2 or more)"));
    assert!(smmu_demo::run(&opts(0, 1), &mut |_| {}).is_err());
}

#[test]
fn two_arm64_vms_over_iommufd_pass_every_check() {
    let mut lines = Vec::new();
    let o = DemoOptions {
        uapi: Uapi::Iommufd,
        ..opts(2, 2)
    };
    let s = smmu_demo::run(&o, &mut |l| lines.push(l)).unwrap();
    assert_eq!(s.errors, 0, "{lines:?}");
    assert_eq!((s.vms, s.pasids), (2, 4));
    assert!(s.cross_vm_checked);
    // Per process: copy, fill and two compares of 4 pages, and 256 bytes paged in through
    // the vIOMMU's fault queue.
    assert_eq!(s.bytes_verified, 4 * (4 * 4 * 4096 + 256));
    assert_eq!(s.page_requests_served, 4);
    assert_eq!(s.stale_translations, 0);
    for r in &s.per_vm {
        assert_eq!(r.pasids, [1, 2], "SubstreamIDs are per device, from 1");
        assert_eq!(r.munmap_faults, 2, "F_TRANSLATION through the vEVENT queue");
        assert_eq!(r.cross_vm_refusals, 2);
        assert_eq!(r.binds, 1, "one nested HWPT translating with the CD table");
        assert!(
            r.invalidations_forwarded >= 2 * 2,
            "munmap's TLBI and ATC_INV through HWPT_INVALIDATE"
        );
        assert_eq!(r.host_errors, 0);
    }
    assert_eq!(
        s.to_string(),
        format!(
            "demo (smmuv3, iommufd): 2 VMs, 4 PASIDs, {} bytes verified, 4 page requests served, {} invalidations forwarded, 0 errors",
            s.bytes_verified, s.invalidations_forwarded
        )
    );
}
