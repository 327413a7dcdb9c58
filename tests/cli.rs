//! The `vsva` command's exit codes: a run whose checks pass exits 0; options that would
//! check nothing, and failed checks, exit non-zero.

use std::process::{Command, Output};

fn vsva(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vsva"))
        .args(args)
        .output()
        .expect("the vsva binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn the_demo_refuses_to_check_nothing() {
    for (args, why) in [
        (["--vms", "0"], "--vms 0"),
        (["--processes", "0"], "--processes 0"),
    ] {
        let out = vsva(&["demo", args[0], args[1]]);
        assert!(!out.status.success(), "{args:?}: {}", text(&out.stdout));
        assert!(
            text(&out.stderr).contains(&format!("demo: {why}")),
            "{}",
            text(&out.stderr)
        );
    }
}

#[test]
fn the_demo_runs_on_an_smmuv3_host_or_on_vtd_alone() {
    let args = ["demo", "--vms", "1", "--processes", "1", "--bytes", "4096"];
    let out = vsva(&[&args[..], &["--iommu", "smmuv3"]].concat());
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("smmuv3 VM 0: 1 processes bound"),
        "{stdout}"
    );
    assert!(
        stdout.contains("\ndemo (smmuv3): 1 VMs, 1 PASIDs, ")
            && !stdout.contains("\ndemo: 1 VMs")
            && !stdout.contains("\ndemo (iommufd)"),
        "{stdout}"
    );
    assert!(
        stdout.contains(" 0 errors; cross-VM checks skipped"),
        "{stdout}"
    );
    assert!(stdout.contains("\ndemo (smmuv3): wall time "), "{stdout}");
    let out = vsva(&[&args[..], &["--iommu", "vtd"]].concat());
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(!stdout.contains("smmuv3"), "{stdout}");
    assert!(stdout.contains("\ndemo: 1 VMs, 1 PASIDs, "), "{stdout}");
    // Over iommufd the SMMUv3 demo runs in one process with its own summary line; split,
    // it is a host process and a VM process (issue 12) ending with the same summary line,
    // over the uAPI asked or over each.
    let out = vsva(&[&args[..], &["--iommu", "smmuv3", "--uapi", "iommufd"]].concat());
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("\ndemo (smmuv3, iommufd): 1 VMs, 1 PASIDs, ")
            && stdout.contains(" 0 errors; cross-VM checks skipped")
            && !stdout.contains("\ndemo (smmuv3): "),
        "{stdout}"
    );
    let out = vsva(
        &[
            &args[..],
            &["--iommu", "smmuv3", "--uapi", "iommufd", "--split"],
        ]
        .concat(),
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("\ndemo (smmuv3, iommufd): 1 VMs, 1 PASIDs, ")
            && stdout.contains(" 0 errors; cross-VM checks skipped")
            && !stdout.contains("\ndemo (smmuv3): "),
        "{stdout}"
    );
    let out = vsva(&[&args[..], &["--iommu", "smmuv3", "--split"]].concat());
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("\ndemo (smmuv3): 1 VMs, 1 PASIDs, ")
            && stdout.contains("\ndemo (smmuv3, iommufd): 1 VMs, 1 PASIDs, ")
            && stdout.contains(" 0 errors; cross-VM checks skipped")
            && !stdout.contains("\ndemo: 1 VMs"),
        "{stdout}"
    );
}

#[test]
fn explain_on_smmuv3_prints_ste_cd_and_each_stage1_step_with_its_stage2_walk() {
    let out = vsva(&["explain", "--iommu", "smmuv3"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[1].starts_with("STE: STE Config=Nested "), "{stdout}");
    assert!(lines[2].starts_with("CD: ASID 1 TTB0 "), "{stdout}");
    for level in 0..4 {
        let s1 = lines
            .iter()
            .position(|l| l.starts_with(&format!("S1 L{level} input 0x7f0000000000")))
            .unwrap_or_else(|| panic!("no stage-1 level {level}: {stdout}"));
        // Each stage-1 step is followed by the stage-2 walk of what it points to.
        assert!(lines[s1 + 1].starts_with("S2 L0 input "), "{stdout}");
    }
    assert!(stdout.contains("\nresult: Page {"), "{stdout}");
    // A SubstreamID no process is bound to: the CD is invalid.
    let out = vsva(&["explain", "--iommu", "smmuv3", "--pasid", "9"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(!stdout.contains("result: Page"), "{stdout}");
}

#[test]
fn a_one_vm_demo_passes_and_says_what_it_skipped() {
    let out = vsva(&["demo", "--vms", "1", "--processes", "1", "--bytes", "4096"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("0 errors; cross-VM checks skipped"),
        "{stdout}"
    );
    assert!(stdout.contains("; everything released\n"), "{stdout}");
    assert!(stdout.contains("\ndemo: wall time "), "{stdout}");
    assert!(stdout.contains(" bytes verified per second\n"), "{stdout}");
}

#[test]
fn the_demo_runs_over_each_uapi_or_the_one_asked() {
    let args = ["demo", "--vms", "2", "--processes", "1", "--bytes", "4096"];
    let out = vsva(&args);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let summaries: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains(" VMs, ") && l.ends_with(" 0 errors"))
        .collect();
    // VT-d over each uAPI, then SMMUv3 (over type1).
    assert_eq!(summaries.len(), 3, "{stdout}");
    assert!(
        summaries[0].starts_with("demo: 2 VMs, 2 PASIDs, "),
        "{stdout}"
    );
    assert!(
        summaries[1].starts_with("demo (iommufd): 2 VMs, 2 PASIDs, "),
        "{stdout}"
    );
    assert!(
        summaries[2].starts_with("demo (smmuv3): 2 VMs, 2 PASIDs, "),
        "{stdout}"
    );

    let out = vsva(&[&args[..], &["--uapi", "iommufd"]].concat());
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("\ndemo (iommufd): 2 VMs, 2 PASIDs, ") && !stdout.contains("\ndemo: 2 VMs"),
        "{stdout}"
    );
    assert!(stdout.contains("; everything released\n"), "{stdout}");
    let out = vsva(&[&args[..], &["--uapi", "vfio"]].concat());
    assert!(!out.status.success());
}

#[test]
fn scenarios_whose_checks_pass_exit_zero() {
    for scenario in ["page-request", "cross-vm", "teardown", "migrate-dirty"] {
        let out = vsva(&["run", scenario]);
        let stdout = text(&out.stdout);
        assert!(
            out.status.success(),
            "{scenario}: {stdout}{}",
            text(&out.stderr)
        );
        assert!(!stdout.contains("WRONG"), "{stdout}");
    }
    // migrate-dirty runs on the SMMUv3 host too; the other scenarios are VT-d's.
    let out = vsva(&["run", "migrate-dirty", "--iommu", "smmuv3"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        !stdout.contains("WRONG") && stdout.contains("0 pages differ"),
        "{stdout}"
    );
    assert!(!vsva(&["run", "page-request", "--iommu", "smmuv3"])
        .status
        .success());
}

#[test]
fn the_layers_warnings_reach_stderr() {
    // The cross-VM scenario makes a device fault on purpose; the host driver logs each
    // fault record as a warning, which the command's log subscriber shows.
    let out = vsva(&["run", "cross-vm"]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("WARN") && stderr.contains("fault"),
        "{stderr}"
    );
    // RUST_LOG chooses the level: errors only hides them.
    let quiet = Command::new(env!("CARGO_BIN_EXE_vsva"))
        .args(["run", "cross-vm"])
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    assert!(
        !text(&quiet.stderr).contains("WARN"),
        "{}",
        text(&quiet.stderr)
    );
}

/// Issue 12: the cross-process probe serves a host over a UNIX socket in the bench
/// process, and its checks (every invalidation forwarded and answered over the socket,
/// every page request served and answered) pass; its four figures are in the JSON.
#[test]
fn the_socket_probe_runs_and_its_checks_pass() {
    let out = vsva(&["bench", "--quick", "--only", "socket-forwarded", "--json"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let json = stdout.lines().last().expect("a JSON line");
    for key in [
        "\"socket_fwd_inv_ns\"",
        "\"socket_fwd_inv_ratio\"",
        "\"socket_prq_ns\"",
        "\"socket_prq_ratio\"",
    ] {
        assert!(json.contains(key), "{key} missing from {json}");
    }
}

/// Issue 11: the iommufd-vs-type1 probe boots a VM on each uAPI in one run, and its checks
/// (each mmu-notifier invalidation forwarded once per guest wait, on both) pass; its two
/// figures are in the JSON.
#[test]
fn the_iommufd_forwarded_probe_runs_and_its_checks_pass() {
    let out = vsva(&["bench", "--quick", "--only", "iommufd-forwarded", "--json"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let json = stdout.lines().last().expect("a JSON line");
    for key in ["\"iommufd_fwd_inv_ns\"", "\"iommufd_fwd_inv_ratio\""] {
        assert!(json.contains(key), "{key} missing from {json}");
    }
}
