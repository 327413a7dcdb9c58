//! `vsva demo` as a library call: every check passes, and the counts add up to what the
//! workload does; with faults injected, the summary counts them as errors and says so.

use std::sync::Arc;

use vsva_testbed::demo::{run, Demo, DemoError, DemoOptions};
use vsva_testbed::stack::{Uapi, VmContainer, GUEST_DEVICE_SID};
use vsva_uapi::{
    error::Errno, request::BindGpasid, request::CacheInvalidate, request::PageResponse,
};
use vsva_vmm::{HostSva, PasidSource};
use vsva_vtd::{addr::Pasid, addr::SourceId};

#[test]
fn the_demo_checks_every_byte_and_counts_what_it_did() {
    let opts = DemoOptions {
        seed: 7,
        vms: 2,
        processes: 2,
        bytes: 5 * 4096,
        host_memory: 2 << 30,
        progress: false,
        uapi: Uapi::Type1,
    };
    let mut lines = Vec::new();
    let summary = run(&opts, &mut |l| lines.push(l)).unwrap();
    assert_eq!(summary.errors, 0, "{lines:#?}");
    assert_eq!((summary.vms, summary.pasids), (2, 4));
    // Each lazily mapped buffer of 5 pages takes one page request per page.
    assert_eq!(summary.page_requests_served, 2 * 2 * 5);
    // Copy and fill verify whole buffers; compare verifies up to the changed byte.
    assert!(summary.bytes_verified >= 2 * 2 * 2 * 5 * 4096);
    assert_eq!(summary.stale_translations, 0);
    assert_eq!(summary.left_after_shutdown.allocated_bytes, 0);
    assert!(
        summary.left_after_shutdown.is_empty(),
        "{}",
        summary.left_after_shutdown
    );
    assert_eq!((summary.host_errors, summary.failed_shutdowns), (0, 0));
    assert!(summary.cross_vm_checked);
    assert!(
        lines.iter().any(|l| l.ends_with("; everything released")),
        "{lines:#?}"
    );
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
    assert!(summary.wall_seconds > 0.0);
    let rate = summary.bytes_verified as f64 / summary.wall_seconds;
    assert!((summary.bytes_verified_per_second() - rate).abs() <= rate * 1e-9);
    assert!(
        summary.timing().starts_with("demo: wall time ")
            && summary.timing().ends_with(" bytes verified per second"),
        "{}",
        summary.timing()
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
        uapi: Uapi::Type1,
    };
    let a = run(&opts(1), &mut |_| ()).unwrap();
    let b = run(&opts(2), &mut |_| ()).unwrap();
    assert_eq!((a.errors, b.errors), (0, 0));
    // The compare step changes a byte at a seeded offset: verified counts differ.
    assert_ne!(a.bytes_verified, b.bytes_verified);
}

fn small(vms: usize, processes: usize) -> DemoOptions {
    DemoOptions {
        seed: 3,
        vms,
        processes,
        bytes: 2 * 4096,
        host_memory: 1 << 30,
        progress: false,
        uapi: Uapi::Type1,
    }
}

/// The VMM's path to the host, with every cache invalidation refused.
struct InvalidationsFail(VmContainer);

impl PasidSource for InvalidationsFail {
    fn pasid_alloc(&self, min: u32, max: u32) -> Result<Pasid, Errno> {
        PasidSource::pasid_alloc(&*self.0, min, max)
    }

    fn pasid_free(&self, pasid: Pasid) -> Result<(), Errno> {
        PasidSource::pasid_free(&*self.0, pasid)
    }
}

impl HostSva for InvalidationsFail {
    fn bind_gpasid(&self, bind: &BindGpasid) -> Result<(), Errno> {
        HostSva::bind_gpasid(&*self.0, bind)
    }

    fn unbind_gpasid(&self, bind: &BindGpasid) -> Result<(), Errno> {
        HostSva::unbind_gpasid(&*self.0, bind)
    }

    fn cache_invalidate(&self, _: &CacheInvalidate) -> Result<(), Errno> {
        Err(Errno::ENODEV)
    }

    fn page_response(&self, host_sid: SourceId, resp: &PageResponse) -> Result<(), Errno> {
        HostSva::page_response(&*self.0, host_sid, resp)
    }
}

#[test]
fn failed_host_calls_of_the_viommu_are_errors() {
    let demo = Demo::boot(&small(1, 1)).unwrap();
    let vm = &demo.vms()[0];
    vm.viommu.detach_passthrough(GUEST_DEVICE_SID).unwrap();
    vm.viommu
        .attach_passthrough(
            GUEST_DEVICE_SID,
            vm.host_sid,
            Arc::new(InvalidationsFail(vm.container().unwrap().clone())),
        )
        .unwrap();
    let mut lines = Vec::new();
    let summary = demo.run(&mut |l| lines.push(l)).unwrap();
    assert_eq!(summary.invalidations_forwarded, 0, "{lines:#?}");
    assert!(summary.host_errors > 0, "{lines:#?}");
    assert!(
        summary.errors as u64 >= summary.host_errors,
        "{summary:?}\n{lines:#?}"
    );
    assert!(!summary.to_string().ends_with(" 0 errors"), "{summary}");
    assert!(
        lines.iter().any(|l| l.contains("error: vIOMMU host call")),
        "{lines:#?}"
    );
}

#[test]
fn what_the_host_still_holds_after_shutdown_is_an_error() {
    let demo = Demo::boot(&small(2, 1)).unwrap();
    // Host memory and a PASID taken while the VMs run, and never given back.
    let leaked = demo.host().frames.alloc_range(2 << 20, 2 << 20).unwrap();
    let set = {
        let mut pasids = demo.host().pasids.lock().unwrap();
        let set = pasids.create_set(1).unwrap();
        pasids.alloc(set, 1, 100).unwrap();
        set
    };
    let mut lines = Vec::new();
    let summary = demo.run(&mut |l| lines.push(l)).unwrap();
    let left = summary.left_after_shutdown;
    assert_eq!((left.allocated_bytes, left.pasids), (2 << 20, 1), "{left}");
    assert!(summary.errors > 0);
    assert!(
        !lines.iter().any(|l| l.ends_with("; everything released")),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("NOT everything released (2097152 bytes allocated")),
        "{lines:#?}"
    );
    let _ = (leaked, set);
}

#[test]
fn options_that_check_nothing_are_refused() {
    for (vms, processes, flag) in [
        (0, 1, "--vms 0"),
        (1, 0, "--processes 0"),
        (0, 0, "--vms 0"),
    ] {
        match run(&small(vms, processes), &mut |_| ()) {
            Err(DemoError::Options(why)) => assert!(why.starts_with(flag), "{why}"),
            other => panic!("{vms} VMs, {processes} processes: {other:?}"),
        }
    }
}

#[test]
fn one_vm_says_the_cross_vm_checks_were_skipped() {
    let mut lines = Vec::new();
    let summary = run(&small(1, 1), &mut |l| lines.push(l)).unwrap();
    assert_eq!(summary.errors, 0, "{lines:#?}");
    assert!(!summary.cross_vm_checked);
    assert_eq!(summary.per_vm[0].cross_vm_refusals, 0);
    assert!(
        summary
            .to_string()
            .ends_with("0 errors; cross-VM checks skipped (they need --vms 2 or more)"),
        "{summary}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("cross-VM checks skipped")),
        "{lines:#?}"
    );
}

/// The same demo over iommufd: every check passes, the counts add up as over type1, the
/// guest's PASIDs are its own (1 and 2 in each VM), every bind was a nested HWPT and the
/// host holds nothing after shutdown.
#[test]
fn the_demo_passes_over_iommufd() {
    let opts = DemoOptions {
        seed: 7,
        vms: 2,
        processes: 2,
        bytes: 5 * 4096,
        host_memory: 2 << 30,
        progress: false,
        uapi: Uapi::Iommufd,
    };
    let mut lines = Vec::new();
    let summary = run(&opts, &mut |l| lines.push(l)).unwrap();
    assert_eq!(summary.errors, 0, "{lines:#?}");
    assert_eq!((summary.vms, summary.pasids), (2, 4));
    assert_eq!(summary.page_requests_served, 2 * 2 * 5);
    assert!(summary.bytes_verified >= 2 * 2 * 2 * 5 * 4096);
    assert_eq!(summary.stale_translations, 0);
    assert!(
        summary.left_after_shutdown.is_empty(),
        "{}",
        summary.left_after_shutdown
    );
    assert_eq!((summary.host_errors, summary.failed_shutdowns), (0, 0));
    for vm in &summary.per_vm {
        assert_eq!(vm.pasids, vec![1, 2], "guest-owned PASID numbers");
        assert_eq!(vm.munmap_faults, 2);
        assert_eq!(vm.cross_vm_refusals, 2, "the DMA with the victim's PASID");
        assert_eq!(vm.binds, 2);
        assert!(
            vm.invalidations_forwarded >= 2,
            "munmap invalidations reach the host"
        );
    }
    let line = summary.to_string();
    assert!(
        line.starts_with("demo (iommufd): 2 VMs, 4 PASIDs, ") && line.ends_with(" 0 errors"),
        "{line}"
    );
}
