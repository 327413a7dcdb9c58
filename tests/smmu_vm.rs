//! `vsva vm --iommu smmuv3` as real processes against an SMMUv3 host (issue 12 + 10 + 11):
//! the per-VM SMMUv3 demo finds the in-process counts, over a type1 container and over
//! iommufd; `vsva demo --split --iommu smmuv3` prints the in-process demo's summary line
//! for each uAPI; a VM process SIGKILLed at any stage leaves the host with exactly the live
//! VM's holdings: its STE aborts again with no CD-table pointer, its VMID is free and no
//! TLB entry carries it (over iommufd: its vIOMMU, vDEVICE and HWPTs are gone with its
//! connection). Every wait is bounded.

use std::time::{Duration, Instant};

use vsva_service::{
    client::RemoteFile, protocol::HostState, server::HostConfig, server::IommuArch,
    thread::HostThread,
};
use vsva_testbed::demo::{DemoOptions, VmReport};
use vsva_testbed::smmu_demo;
use vsva_testbed::stack::Uapi;

mod common;
use common::{settle, start_host, stop_clean, WAIT};
#[path = "common/vm_process.rs"]
mod vm_process;
use vm_process::{run_vsva, VmProcess};

fn in_process(seed: u64, vms: usize) -> vsva_testbed::demo::DemoSummary {
    in_process_over(seed, vms, Uapi::Type1)
}

fn in_process_over(seed: u64, vms: usize, uapi: Uapi) -> vsva_testbed::demo::DemoSummary {
    smmu_demo::run(
        &DemoOptions {
            seed,
            vms,
            processes: 2,
            bytes: 65536,
            host_memory: 1 << 30,
            progress: false,
            uapi,
        },
        &mut |_| {},
    )
    .unwrap()
}

#[test]
fn an_smmu_vm_process_runs_the_demo_against_an_smmu_host_process_with_the_in_process_counts() {
    let host = start_host("smmu-demo", "2G", &["--iommu", "smmuv3", "--strict"]);
    let (probe, empty) = host.probe().unwrap();
    let vm = VmProcess::start(
        host.socket(),
        &[
            "--iommu",
            "smmuv3",
            "--seed",
            "3",
            "--processes",
            "2",
            "--bytes",
            "65536",
            "--json",
        ],
    );
    let (code, lines, err) = vm.finish();
    assert_eq!(code, Some(0), "{lines:?}\n{err}");
    let remote: VmReport = serde_json::from_str(lines.last().unwrap()).unwrap();
    let local = in_process(3, 1);
    assert_eq!(local.errors, 0);
    let local = &local.per_vm[0];
    assert_eq!(remote.pasids, local.pasids);
    assert_eq!(remote.bytes_verified, local.bytes_verified);
    assert!(remote.bytes_verified > 2 * 65536);
    assert_eq!(remote.page_requests_served, 2);
    assert_eq!(remote.munmap_faults, 2);
    assert_eq!(
        remote.invalidations_forwarded,
        local.invalidations_forwarded
    );
    assert!(remote.invalidations_forwarded > 0);
    assert_eq!((remote.host_errors, remote.errors.len()), (0, 0));
    assert_eq!(settle(&probe, empty), empty);
    drop(probe);
    let report = stop_clean(host);
    assert!(report.contains("strict mode clean"), "{report}");
    assert!(
        report.contains("SMMUv3 interrupt thread:") && report.contains(", 2 page requests,"),
        "{report}"
    );
}

#[test]
fn an_iommufd_smmu_vm_process_finds_the_in_process_iommufd_counts() {
    let host = start_host("smmu-ifd-demo", "2G", &["--iommu", "smmuv3", "--strict"]);
    let (probe, empty) = host.probe().unwrap();
    let vm = VmProcess::start(
        host.socket(),
        &[
            "--iommu",
            "smmuv3",
            "--uapi",
            "iommufd",
            "--seed",
            "3",
            "--processes",
            "2",
            "--bytes",
            "65536",
            "--json",
        ],
    );
    let (code, lines, err) = vm.finish();
    assert_eq!(code, Some(0), "{lines:?}\n{err}");
    let remote: VmReport = serde_json::from_str(lines.last().unwrap()).unwrap();
    let local = in_process_over(3, 1, Uapi::Iommufd);
    assert_eq!(local.errors, 0);
    let local = &local.per_vm[0];
    assert_eq!(remote.pasids, local.pasids);
    assert_eq!(remote.bytes_verified, local.bytes_verified);
    assert!(remote.bytes_verified > 2 * 65536);
    // The page requests come through the fault queue's fd, the munmap faults through the
    // vEVENT queue's fd.
    assert_eq!(remote.page_requests_served, 2);
    assert_eq!(remote.munmap_faults, 2);
    assert_eq!(
        remote.invalidations_forwarded,
        local.invalidations_forwarded
    );
    assert!(remote.invalidations_forwarded > 0);
    assert_eq!((remote.host_errors, remote.errors.len()), (0, 0));
    assert_eq!(settle(&probe, empty), empty);
    drop(probe);
    let report = stop_clean(host);
    assert!(report.contains("strict mode clean"), "{report}");
    assert!(
        report.contains("SMMUv3 interrupt thread:") && report.contains(", 2 page requests,"),
        "{report}"
    );
}

#[test]
fn the_split_smmu_demo_without_a_uapi_prints_the_in_process_line_of_each() {
    let (status, out, err) = run_vsva(&[
        "demo",
        "--split",
        "--iommu",
        "smmuv3",
        "--seed",
        "6",
        "--vms",
        "2",
        "--processes",
        "2",
        "--bytes",
        "65536",
    ]);
    assert!(status.success(), "{out}\n{err}");
    for (uapi, head) in [
        (Uapi::Type1, "demo (smmuv3): 2 VMs, 4 PASIDs, "),
        (Uapi::Iommufd, "demo (smmuv3, iommufd): 2 VMs, 4 PASIDs, "),
    ] {
        let local = in_process_over(6, 2, uapi);
        assert_eq!(local.errors, 0);
        let want = local.to_string();
        assert!(want.starts_with(head), "{want}");
        assert!(out.lines().any(|l| l == want), "want {want:?} in\n{out}");
    }
    let clean = out
        .lines()
        .filter(|l| {
            l.starts_with("vsva host: served ")
                && l.ends_with("nothing left behind; strict mode clean")
        })
        .count();
    assert_eq!(clean, 2, "{out}");
}

#[test]
fn the_split_smmu_demo_prints_the_in_process_summary_line() {
    let (status, out, err) = run_vsva(&[
        "demo",
        "--split",
        "--iommu",
        "smmuv3",
        "--seed",
        "5",
        "--vms",
        "2",
        "--processes",
        "2",
        "--bytes",
        "65536",
    ]);
    assert!(status.success(), "{out}\n{err}");
    let local = in_process(5, 2);
    assert_eq!(local.errors, 0);
    let want = local.to_string();
    assert!(
        want.starts_with("demo (smmuv3): 2 VMs, 4 PASIDs, "),
        "{want}"
    );
    assert!(out.lines().any(|l| l == want), "want {want:?} in\n{out}");
    assert!(
        out.lines().any(|l| l.starts_with("vsva host: served ")
            && l.ends_with("nothing left behind; strict mode clean")),
        "{out}"
    );
}

/// An SMMUv3 host served in this process (so that the test sees its stream table, VMIDs
/// and TLB), for VM processes.
fn smmu_host() -> HostThread {
    let config = HostConfig {
        iommu: IommuArch::Smmuv3,
        memory: 2 << 30,
        strict: true,
        ..HostConfig::default()
    };
    HostThread::start("smmu-vm", &config).unwrap()
}

/// Word 0 of an aborting STE: V=1, Config=abort, no S1ContextPtr.
fn aborts(ste: Option<[u64; 8]>) -> bool {
    ste.is_some_and(|s| s[0] & 0xf == 1 && s[0] & 0x000f_ffff_ffff_ffc0 == 0)
}

/// Whether word 0 points at a CD table.
fn nested(ste: Option<[u64; 8]>) -> bool {
    ste.is_some_and(|s| s[0] & 1 == 1 && s[0] & 0x000f_ffff_ffff_ffc0 != 0)
}

/// A VM paused at `invalidate` after its device ran, beside which other VMs are killed:
/// its stream's nested STE, its VMID's TLB entries and the host's state with it.
struct Live {
    vm: VmProcess,
    sid: u32,
    vmid: u16,
    ste: Option<[u64; 8]>,
    tlb: usize,
    state: HostState,
}

/// The host's state once it holds still: the same in ten reads 10 ms apart (within
/// [`WAIT`]). A paused VM's host-side work in flight when it printed its pause line (a
/// fault record the host's pump has yet to send, a page-request group it has yet to
/// answer) lands after the line, so a baseline read at once may miss it.
fn steady(probe: &RemoteFile) -> HostState {
    let deadline = Instant::now() + WAIT;
    let mut last = probe.host_state().unwrap();
    let mut same = 0;
    while same < 10 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        let s = probe.host_state().unwrap();
        same = if s == last { same + 1 } else { 0 };
        last = s;
    }
    last
}

impl Live {
    /// Starts `vsva vm` with `uapi`'s arguments (2 processes, seed 9) and waits for its
    /// pause: a nested STE, a VMID, TLB entries tagged with it.
    fn start(served: &HostThread, probe: &RemoteFile, uapi: &[&str]) -> Live {
        let smmu = served.service.smmu().unwrap();
        let args = [
            "--seed",
            "9",
            "--processes",
            "2",
            "--bytes",
            "65536",
            "--pause-at",
            "invalidate",
            "--json",
        ];
        let mut vm = VmProcess::start(&served.path, &[uapi, &args[..]].concat());
        vm.wait_line("paused at invalidate");
        let state = steady(probe);
        let [(sid, vmid)] = smmu.owned_streams()[..] else {
            panic!("{:?}", smmu.owned_streams());
        };
        let ste = smmu.ste(sid);
        assert!(nested(ste), "{ste:x?}");
        let tlb = smmu.hardware().tlb_entries_of(vmid);
        assert!(tlb > 0);
        Live {
            vm,
            sid,
            vmid,
            ste,
            tlb,
            state,
        }
    }

    /// Starts a victim VM with `uapi`'s arguments paused at `stage`, lets `check` look at
    /// the host with it (its state, stream and VMID), kills it, and checks that the host
    /// is back to what it held with the live VM alone: the victim's STE aborts, its VMID
    /// is free with no TLB entry, the live VM's STE and TLB entries are untouched.
    fn kill_victim(
        &self,
        served: &HostThread,
        probe: &RemoteFile,
        uapi: &[&str],
        stage: &str,
        check: impl Fn(&HostState, u32, u16),
    ) {
        let smmu = served.service.smmu().unwrap();
        let bytes = if stage == "dma" { "8388608" } else { "65536" };
        let args = [
            "--index",
            "1",
            "--processes",
            "1",
            "--bytes",
            bytes,
            "--pause-at",
            stage,
        ];
        let mut victim = VmProcess::start(&served.path, &[uapi, &args[..]].concat());
        victim.wait_line(&format!("paused at {stage}"));
        let (sid, vmid) = smmu
            .owned_streams()
            .into_iter()
            .find(|&(s, _)| s != self.sid)
            .unwrap_or_else(|| panic!("{stage}: the victim holds no stream"));
        let during = probe.host_state().unwrap();
        assert_eq!(during.connections, self.state.connections + 1, "{stage}");
        assert_eq!(during.domain_ids, self.state.domain_ids + 1, "{stage}");
        assert_eq!(during.devices, self.state.devices + 1, "{stage}");
        check(&during, sid, vmid);
        victim.child.kill().unwrap();
        victim.child.wait().unwrap();
        let after = settle(probe, self.state);
        assert_eq!(
            after, self.state,
            "killed at {stage}: the host kept its state"
        );
        assert!(aborts(smmu.ste(sid)), "{stage}: {:x?}", smmu.ste(sid));
        assert!(!smmu.vmids().contains(&vmid), "{stage}");
        assert_eq!(smmu.hardware().tlb_entries_of(vmid), 0, "{stage}");
        assert_eq!(smmu.ste(self.sid), self.ste, "{stage}");
        assert_eq!(
            smmu.hardware().tlb_entries_of(self.vmid),
            self.tlb,
            "{stage}"
        );
    }

    /// The live VM goes on: every check passes, and its exit leaves the host as it was
    /// (`empty`, the probe's VMIDs `probe_vmids` alone).
    fn finish(
        self,
        served: &HostThread,
        probe: &RemoteFile,
        empty: HostState,
        probe_vmids: &[u16],
    ) {
        let smmu = served.service.smmu().unwrap();
        let (code, lines, err) = self.vm.finish();
        assert_eq!(code, Some(0), "{lines:?}\n{err}");
        let report: VmReport = serde_json::from_str(lines.last().unwrap()).unwrap();
        assert_eq!((report.errors.len(), report.host_errors), (0, 0));
        assert_eq!(report.munmap_faults, 2);
        assert_eq!(settle(probe, empty), empty);
        assert!(aborts(smmu.ste(self.sid)));
        assert_eq!(smmu.vmids(), probe_vmids);
    }
}

#[test]
fn an_smmu_vm_killed_at_any_stage_leaves_exactly_the_live_vms_holdings() {
    let served = smmu_host();
    let smmu = served.service.smmu().unwrap().clone();
    let probe = RemoteFile::connect(&served.path).unwrap();
    let empty = probe.host_state().unwrap();
    // The probe's own container holds a VMID.
    let probe_vmids = smmu.vmids();
    assert_eq!(probe_vmids.len(), 1);
    let type1 = ["--iommu", "smmuv3"];
    let live = Live::start(&served, &probe, &type1);
    for stage in ["bind", "invalidate", "page-request", "dma"] {
        live.kill_victim(&served, &probe, &type1, stage, |_, sid, vmid| {
            match stage {
                // Before its ATTACH_PASID_TABLE: stage 2 alone.
                "bind" => assert!(!nested(smmu.ste(sid)), "{stage}: {:x?}", smmu.ste(sid)),
                // Its device ran through its CD table: TLB entries with its VMID.
                "invalidate" => {
                    assert!(nested(smmu.ste(sid)), "{stage}");
                    assert!(smmu.hardware().tlb_entries_of(vmid) > 0, "{stage}");
                }
                // Its device waits for a page response.
                "page-request" => assert!(nested(smmu.ste(sid)), "{stage}"),
                _ => {}
            }
        });
    }
    live.finish(&served, &probe, empty, &probe_vmids);
    drop((probe, smmu));
    let report = served.finish();
    assert!(report.clean(), "{report}");
}

#[test]
fn an_iommufd_smmu_vm_killed_at_any_stage_leaves_exactly_the_live_vms_holdings() {
    let served = smmu_host();
    let smmu = served.service.smmu().unwrap().clone();
    let probe =
        RemoteFile::connect_kind(&served.path, vsva_service::protocol::FILE_IOMMUFD).unwrap();
    let empty = probe.host_state().unwrap();
    assert!(smmu.vmids().is_empty(), "an iommufd probe holds no VMID");
    let iommufd = ["--iommu", "smmuv3", "--uapi", "iommufd"];
    // The live VM's guest STE is nested over its stage 2.
    let live = Live::start(&served, &probe, &iommufd);
    assert_eq!(
        live.state.binds,
        empty.binds + 1,
        "the guest's STE installed"
    );
    let with_live = live.state;
    for stage in ["bind", "invalidate", "dma"] {
        live.kill_victim(&served, &probe, &iommufd, stage, |during, sid, vmid| {
            assert_eq!(
                during.windows,
                with_live.windows + 2,
                "{stage}: RAM, buffer"
            );
            match stage {
                // Before its first nested HWPT: its nest parent's stage 2 alone.
                "bind" => {
                    assert!(!nested(smmu.ste(sid)), "{stage}: {:x?}", smmu.ste(sid));
                    assert_eq!(during.binds, with_live.binds, "{stage}");
                }
                // Its device ran through its CD table: TLB entries with its VMID.
                "invalidate" => {
                    assert!(nested(smmu.ste(sid)), "{stage}");
                    assert_eq!(during.binds, with_live.binds + 1, "{stage}");
                    assert!(smmu.hardware().tlb_entries_of(vmid) > 0, "{stage}");
                }
                _ => {}
            }
        });
    }
    live.finish(&served, &probe, empty, &[]);
    drop((probe, smmu));
    let report = served.finish();
    assert!(report.clean(), "{report}");
}
