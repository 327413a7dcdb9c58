//! The scale scenario, small (not timed): VMs fill a PASID range with their full quotas,
//! one more VM is refused with ENOSPC once the range is full and that refusal changes
//! nothing; VMs with devices bind PASIDs through the driver; every teardown, one VM alone
//! and all of them, leaves nothing behind.

use vsva_testbed::scale::{run_scale, ScaleConfig};

#[test]
fn small_scale_scenario_fills_the_space_and_leaks_nothing() {
    let cfg = ScaleConfig::SMALL;
    let r = run_scale(&cfg).unwrap();
    assert!(r.problems().is_empty(), "{:#?}\n{r}", r.problems());

    let f = &r.full;
    assert_eq!(f.pasids_allocated, 20 * 50);
    assert_eq!(f.alloc.count, 20 * 50);
    assert_eq!(f.extra_vm.allocated, 10, "the range had 10 PASIDs left");
    let refusal = f
        .extra_vm
        .refusal
        .as_ref()
        .expect("the extra VM is refused");
    assert_eq!(refusal.errno(), -libc::ENOSPC);
    assert!(f.extra_vm.refusal_changed_nothing);
    assert!(
        f.table_bytes > 0,
        "each VM's domain holds a second-level root"
    );
    assert_eq!(f.teardown.count, 20);
    assert_eq!(f.after, f.before);
    assert_eq!(f.after.pasids, 0);
    assert_eq!(f.after.domain_ids, 0);

    let b = &r.bound;
    assert_eq!((b.vms, b.bound, b.bind.count), (20, 100, 100));
    assert!(b.table_bytes > f.table_bytes, "devices add PASID tables");
    assert_eq!(b.one_vm_after, b.one_vm_before);
    assert_eq!(b.teardown.count, 20);
    assert_eq!(b.after, b.before);
    assert_eq!((b.after.devices, b.after.page_request_routes), (0, 0));
}

#[test]
fn the_issue_scenario_is_the_whole_space_but_575() {
    let cfg = ScaleConfig::ISSUE;
    let held = cfg.full_vms as u64 * u64::from(cfg.quota);
    assert_eq!(cfg.space(), (1 << 20) - 1);
    assert_eq!(cfg.space() - held, 575);
    assert!(cfg.space() - held < u64::from(cfg.quota));
    assert_eq!(cfg.bound_vms * cfg.bound_per_vm, 10_000);
}
