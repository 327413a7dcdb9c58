//! `vsva load` as CI runs it: a host process, two VM processes looping bind → DMA →
//! verify → invalidate → unbind, one killed about every 300 ms and replaced; bounded in
//! time (2 s of load). On a VT-d host (x86-64 VMs with a virtual VT-d) and on an SMMUv3
//! host (arm64 VMs with a virtual SMMUv3).

use std::process::Command;
use std::sync::{Mutex, PoisonError};

/// One load at a time: each wants the machine's cores for its seconds of load.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs `vsva load` with chaos on the host IOMMU `iommu` and checks its JSON report.
fn load_with_chaos(iommu: &str) {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    let out = Command::new(env!("CARGO_BIN_EXE_vsva"))
        .args([
            "load",
            "--vms",
            "2",
            "--seconds",
            "2",
            "--kill-every",
            "300",
            "--json",
            "--iommu",
            iommu,
        ])
        .output()
        .expect("vsva load runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    let last = stdout.lines().last().expect("a JSON line");
    let v: serde_json::Value = serde_json::from_str(last).expect("one JSON object");
    let n = |k: &str| {
        v[k].as_f64()
            .unwrap_or_else(|| panic!("{k} missing: {last}"))
    };
    assert_eq!(v["iommu"], iommu, "{last}");
    // Errors cover failed cycles, the keeper buffers, the host's STATE against the live
    // VMs' holdings, and the host's own teardown report.
    assert_eq!(n("errors"), 0.0, "{last}\n{stderr}");
    assert!(n("kills") > 0.0, "{last}");
    assert!(n("started") > 2.0, "killed VMs are replaced: {last}");
    assert!(n("bytes_verified") > 0.0, "{last}");
    assert!(n("ops") > 0.0 && n("ops_per_sec") > 0.0, "{last}");
    assert!(
        n("fwd_inv_samples") > 0.0 && n("fwd_inv_p50_ns") > 0.0,
        "{last}"
    );
    assert!(n("fwd_inv_p99_ns") >= n("fwd_inv_p50_ns"), "{last}");
    assert!(n("prq_samples") > 0.0 && n("prq_p50_ns") > 0.0, "{last}");
}

#[test]
fn load_with_chaos_survives_kills_verifies_bytes_and_leaves_the_host_as_the_live_vms_hold_it() {
    load_with_chaos("vtd");
}

#[test]
fn smmu_load_with_chaos_survives_kills_verifies_bytes_and_leaves_the_host_as_the_live_vms_hold_it()
{
    load_with_chaos("smmuv3");
}
