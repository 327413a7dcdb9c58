//! `vsva vm` as a real process against a `vsva host` process: the per-VM demo runs with
//! the same vmm and guest code as in one process and finds the same counts; a host that
//! goes away makes it fail clearly. Every wait is bounded.

use vsva_service::protocol::HostState;
use vsva_testbed::demo::{self, DemoOptions, VmReport};
use vsva_testbed::stack::Uapi;

mod common;
use common::{settle, start_host, stop_clean};
#[path = "common/vm_process.rs"]
mod vm_process;
use vm_process::{run_vsva, VmProcess};

/// `vsva vm --uapi <uapi>` against a host process finds the counts of the same workload
/// over the same uAPI in one process, and its exit leaves the host as it was.
fn the_vm_process_finds_the_in_process_counts(name: &str, uapi: Uapi) {
    let host = start_host(name, "2G", &[]);
    let (probe, empty) = host.probe().unwrap();
    let vm = VmProcess::start(
        host.socket(),
        &[
            "--seed",
            "3",
            "--processes",
            "2",
            "--bytes",
            "65536",
            "--uapi",
            uapi_arg(uapi),
            "--json",
        ],
    );
    let (code, lines, err) = vm.finish();
    assert_eq!(code, Some(0), "{lines:?}\n{err}");
    let remote: VmReport = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert!(
        lines[0].starts_with("vm0: 2 processes bound to PASIDs") && lines[0].ends_with("0 errors"),
        "{lines:?}"
    );
    // The same workload in one process: the same PASIDs, bytes, page requests,
    // invalidations and faults.
    let local = demo::run(
        &DemoOptions {
            seed: 3,
            vms: 1,
            processes: 2,
            bytes: 65536,
            host_memory: 1 << 30,
            progress: false,
            uapi,
        },
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(local.errors, 0, "{local:?}");
    let local = &local.per_vm[0];
    assert_eq!(remote.pasids, local.pasids);
    assert_eq!(remote.bytes_verified, local.bytes_verified);
    assert!(remote.bytes_verified > 2 * 65536);
    assert_eq!(remote.page_requests_served, local.page_requests_served);
    assert!(remote.page_requests_served >= 2 * 16);
    assert_eq!(
        remote.invalidations_forwarded,
        local.invalidations_forwarded
    );
    assert_eq!((remote.binds, remote.munmap_faults), (2, 2));
    assert_eq!((remote.host_errors, remote.errors.len()), (0, 0));
    // The VM's exit left the host as it was.
    assert_eq!(settle(&probe, empty), empty);
    drop(probe);
    stop_clean(host);
}

/// The `--uapi` value of `uapi`.
fn uapi_arg(uapi: Uapi) -> &'static str {
    match uapi {
        Uapi::Type1 => "type1",
        Uapi::Iommufd => "iommufd",
    }
}

#[test]
fn a_vm_process_runs_the_demo_against_a_host_process_and_finds_the_in_process_counts() {
    the_vm_process_finds_the_in_process_counts("demo", Uapi::Type1);
}

#[test]
fn a_vm_process_over_iommufd_runs_the_demo_and_finds_the_in_process_iommufd_counts() {
    the_vm_process_finds_the_in_process_counts("demo-iommufd", Uapi::Iommufd);
}

#[test]
fn a_vm_whose_host_is_killed_fails_clearly_with_a_non_zero_exit() {
    let host = start_host("gone", "2G", &[]);
    let mut vm = VmProcess::start(host.socket(), &["--pause-at", "bind"]);
    vm.wait_line("paused at bind");
    host.kill();
    let (code, lines, err) = vm.finish();
    assert_eq!(code, Some(2), "{lines:?}\n{err}");
    assert!(
        err.contains("vsva vm: the vsva host connection was lost"),
        "{err}"
    );
}

/// `vsva demo --split --uapi <uapi>` prints the summary line of the VMs' in-process
/// demos (each alone, its seed) over that uAPI; each VM's cross-VM checks found
/// `refusals` refusals.
fn the_split_demo_prints_the_demos_summary_line(uapi: Uapi, refusals: usize) {
    let (status, out, err) = run_vsva(&[
        "demo",
        "--split",
        "--seed",
        "5",
        "--vms",
        "2",
        "--processes",
        "2",
        "--bytes",
        "65536",
        "--uapi",
        uapi_arg(uapi),
    ]);
    assert!(status.success(), "{out}\n{err}");
    // VM i runs seed + i: the same counts as each VM's demo alone in one process.
    let alone = |seed| {
        let s = demo::run(
            &DemoOptions {
                seed,
                vms: 1,
                processes: 2,
                bytes: 65536,
                host_memory: 1 << 30,
                progress: false,
                uapi,
            },
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(s.errors, 0);
        s
    };
    let (a, b) = (alone(5), alone(6));
    let title = match uapi {
        Uapi::Type1 => "demo",
        Uapi::Iommufd => "demo (iommufd)",
    };
    let want = format!(
        "{title}: 2 VMs, 4 PASIDs, {} bytes verified, {} page requests served, {} invalidations forwarded, 0 errors",
        a.bytes_verified + b.bytes_verified,
        a.page_requests_served + b.page_requests_served,
        a.invalidations_forwarded + b.invalidations_forwarded,
    );
    assert!(out.lines().any(|l| l == want), "want {want:?} in\n{out}");
    let per_vm = format!("; 2 munmap faults and {refusals} cross-VM refusals as expected;");
    for vm in ["vm0: 2 processes", "vm1: 2 processes"] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(vm) && l.contains(&per_vm) && l.ends_with("; 0 errors")),
            "{out}"
        );
    }
    assert!(
        out.lines().any(|l| l.starts_with("vsva host: served ")
            && l.ends_with("nothing left behind; strict mode clean")),
        "the host runs in strict mode and finds nothing: {out}"
    );
}

#[test]
fn the_split_demo_without_uapi_runs_type1_then_iommufd_with_a_summary_each() {
    let (status, out, _) = run_vsva(&[
        "demo",
        "--split",
        "--vms",
        "1",
        "--processes",
        "1",
        "--bytes",
        "4096",
        "--json",
    ]);
    assert!(status.success(), "{out}");
    let summaries: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let uapis: Vec<&serde_json::Value> = summaries.iter().map(|s| &s["uapi"]).collect();
    assert_eq!(uapis, ["Type1", "Iommufd"], "{out}");
    assert!(
        summaries
            .iter()
            .all(|s| s["errors"] == 0 && s["bytes_verified"].as_u64() > Some(4096)),
        "{out}"
    );
}

#[test]
fn the_split_demo_runs_a_host_and_a_process_per_vm_and_prints_the_demos_summary_line() {
    // The cross-VM checks ran across the processes: each VM's container refused the bind,
    // invalidation and free of each of the other VM's two PASIDs with -EPERM, and its
    // device's DMA with them was refused.
    the_split_demo_prints_the_demos_summary_line(Uapi::Type1, 8);
}

#[test]
fn the_split_demo_over_iommufd_prints_the_iommufd_demos_summary_line() {
    // Over iommufd the guest owns PASID numbers: each VM's device DMA with the other VM's
    // two PASID numbers ran in its own address spaces and left the other's bytes as they
    // were.
    the_split_demo_prints_the_demos_summary_line(Uapi::Iommufd, 2);
}

/// Each stage a VM is killed at, and what the host must hold for it while it waits there
/// (beyond the live VM's holdings): checked before the kill, so the kill lands where it
/// should.
fn holds_at(uapi: Uapi, stage: &str, during: &HostState, live: &HostState) -> bool {
    let more = |a: u64, b: u64| a > b;
    let common = during.connections == live.connections + 1
        && more(during.windows, live.windows)
        && more(during.devices, live.devices)
        && more(during.domain_ids, live.domain_ids)
        && more(during.dma_mappings, live.dma_mappings);
    common
        && match (uapi, stage) {
            // The PASID is allocated, the bind not made.
            (Uapi::Type1, "bind") => during.pasids == live.pasids + 1 && during.binds == live.binds,
            // The guest allocated the PASID (the host has none), its HWPT not attached.
            (Uapi::Iommufd, "bind") => {
                during.pasids == live.pasids
                    && during.binds == live.binds
                    && more(during.page_request_sinks, live.page_request_sinks)
            }
            // A bound PASID whose translations the host's IOTLB holds.
            (_, "invalidate") => during.binds > live.binds && more(during.iotlb, live.iotlb),
            // A page request's group waits for its response, its record unread.
            (Uapi::Type1, "page-request") => {
                more(during.page_requests, live.page_requests)
                    && more(during.faults_unread, live.faults_unread)
            }
            // The group waits for its response (its records on the fault fd, unread).
            (Uapi::Iommufd, "page-request") => more(during.page_requests, live.page_requests),
            _ => true,
        }
}

#[test]
fn a_vm_killed_mid_bind_invalidation_dma_or_page_request_loses_exactly_its_own_state() {
    a_killed_vm_loses_exactly_its_own_state("crash", Uapi::Type1);
}

/// Over iommufd the killed VM's IOAS and its mapping, its HWPTs (their domains and
/// attachments), its fault queue and the device's binding go with its connection.
#[test]
fn an_iommufd_vm_killed_mid_bind_invalidation_dma_or_page_request_loses_exactly_its_own_state() {
    a_killed_vm_loses_exactly_its_own_state("crash-iommufd", Uapi::Iommufd);
}

/// A live VM over `uapi` paused before an invalidation; a VM over `uapi` killed at each
/// stage: the host comes back to what it held with the live VM alone, which then finishes
/// every check.
fn a_killed_vm_loses_exactly_its_own_state(name: &str, uapi: Uapi) {
    let host = start_host(name, "2G", &[]);
    let (probe, empty) = host.probe().unwrap();
    // The live VM stops before an invalidation: it holds a window, its mappings, a device,
    // a domain id, two bound PASIDs and their cached translations.
    let mut live = VmProcess::start(
        host.socket(),
        &[
            "--seed",
            "9",
            "--processes",
            "2",
            "--bytes",
            "65536",
            "--pause-at",
            "invalidate",
            "--uapi",
            uapi_arg(uapi),
            "--json",
        ],
    );
    live.wait_line("paused at invalidate");
    let with_live = probe.host_state().unwrap();
    assert!(with_live.binds >= 1 && with_live.iotlb > 0, "{with_live:?}");
    for stage in ["bind", "invalidate", "page-request", "dma"] {
        // An 8 MiB copy is the dma stage's long DEVICE_RUN; the kill lands as it runs.
        let bytes = if stage == "dma" { "8388608" } else { "65536" };
        let mut victim = VmProcess::start(
            host.socket(),
            &[
                "--index",
                "1",
                "--processes",
                "1",
                "--bytes",
                bytes,
                "--pause-at",
                stage,
                "--uapi",
                uapi_arg(uapi),
            ],
        );
        victim.wait_line(&format!("paused at {stage}"));
        if stage != "dma" {
            let during = probe.host_state().unwrap();
            assert!(
                holds_at(uapi, stage, &during, &with_live),
                "{stage}: the victim holds {during:?} beyond {with_live:?}"
            );
        }
        victim.child.kill().unwrap();
        victim.child.wait().unwrap();
        let after = settle(&probe, with_live);
        assert_eq!(
            after, with_live,
            "killed at {stage}: the host kept the victim's state"
        );
    }
    // The live VM goes on: every check passes, its buffers are intact, and its exit
    // leaves the host as it was.
    let (code, lines, err) = live.finish();
    assert_eq!(code, Some(0), "{lines:?}\n{err}");
    let report: VmReport = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(
        (report.errors.len(), report.host_errors),
        (0, 0),
        "{report:?}"
    );
    assert_eq!(report.munmap_faults, 2);
    assert_eq!(settle(&probe, empty), empty);
    drop(probe);
    stop_clean(host);
}
