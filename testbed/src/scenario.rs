//! `vsva run <scenario>` and `vsva explain`: short scripted runs of the whole stack that
//! show one behaviour each, printing what every layer did. Each checks what it shows; a
//! failed check is printed as WRONG and fails the run.

use std::fmt::{self, Write as _};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::scale::{run_scale, ScaleConfig};
use vsva_guest::{process::Process, process::Prot};
use vsva_hw::dma::{CompletionStatus, Operation};
use vsva_uapi::file::VfioIoctls;
use vsva_vtd::{addr::Gva, addr::Pasid, flpte::FlPagingMode, walk::AccessRequest};

use crate::holdings::HostHoldings;
use crate::migrate::{migrate_dirty, MigrateConfig, SmmuDirtyHost};
use crate::stack::{Host, StackError, Vm};

/// What a scenario printed, and the checks of it that failed.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// What the scenario printed, line by line.
    pub text: String,
    /// The checks that failed, one line each (empty when the scenario passed).
    pub failed: Vec<String>,
}

impl Outcome {
    /// Every check passed.
    pub fn passed(&self) -> bool {
        self.failed.is_empty()
    }

    /// Records a check: `what` fails the run unless `ok`. Returns `ok`.
    pub(crate) fn check(&mut self, ok: bool, what: impl FnOnce() -> String) -> bool {
        if !ok {
            self.failed.push(what());
        }
        ok
    }
}

impl fmt::Write for Outcome {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.text.push_str(s);
        Ok(())
    }
}

/// Guest RAM of the scenarios' VMs.
const RAM: u64 = 64 << 20;
/// Host memory of the scenarios (sparse).
const HOST_MEMORY: u64 = 4 << 30;

/// The scripted runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// A lazily mapped buffer filled by the device: page requests go up to the guest and
    /// its responses come back down, hop by hop.
    PageRequest,
    /// A second VM tries the first VM's PASID through VFIO and through its own device.
    CrossVm,
    /// A VM is shut down and the host is inspected: nothing is left.
    Teardown,
    /// Issue-size PASID scale: 1,048 VMs holding their full quota of 1,000 PASIDs, one
    /// more VM refused with -ENOSPC, then 1,000 VMs with 10,000 PASIDs bound; set-up,
    /// memory and teardown measured, leaks checked.
    Scale,
    /// Live migration's dirty tracking: devices write while the VMM harvests the dirty
    /// bitmap in rounds and copies the reported pages; every written page is reported,
    /// none other, and the copy equals the source.
    MigrateDirty,
}

fn guest<E: std::fmt::Display>(e: E) -> StackError {
    StackError::Guest(e.to_string())
}

/// A VM with one bound process and one mapped buffer.
struct Bound {
    process: Arc<Process>,
    pasid: Pasid,
    buffer: Gva,
    record: Gva,
}

fn bound(vm: &Vm, lazy: bool) -> Result<Bound, StackError> {
    let process = vm.spawn(FlPagingMode::FourLevel)?;
    let buffer = if lazy {
        process.mmap_lazy(8 * 4096, Prot::READ_WRITE)
    } else {
        process.mmap(8 * 4096, Prot::READ_WRITE)
    }
    .map_err(guest)?;
    let record = process.mmap(4096, Prot::READ_WRITE).map_err(guest)?;
    let pasid = vm.bind(&process)?;
    Ok(Bound {
        process,
        pasid,
        buffer,
        record,
    })
}

/// Runs `scenario`; returns what it printed and which of its checks failed.
pub fn run(scenario: Scenario) -> Result<Outcome, StackError> {
    let host = || Host::new(HOST_MEMORY, true);
    let mut out = Outcome::default();
    match scenario {
        Scenario::PageRequest => page_request(&host()?, &mut out)?,
        Scenario::CrossVm => cross_vm(&host()?, &mut out)?,
        Scenario::Teardown => {
            let host = host()?;
            teardown(&host, HostHoldings::of(&host), &mut out)?
        }
        Scenario::Scale => out.text = scale()?,
        Scenario::MigrateDirty => migrate_dirty(&host()?, &MigrateConfig::RUN, &mut out)?,
    }
    Ok(out)
}

/// Runs `scenario` on an SMMUv3 host (`vsva run --iommu smmuv3`): `migrate-dirty` over a
/// stage-1 domain that tracks dirty pages; the other scenarios are VT-d's only (an error).
pub fn run_smmuv3(scenario: Scenario) -> Result<Outcome, StackError> {
    let mut out = Outcome::default();
    match scenario {
        Scenario::MigrateDirty => migrate_dirty(
            &SmmuDirtyHost::new(HOST_MEMORY, true)?,
            &MigrateConfig::RUN,
            &mut out,
        )?,
        other => {
            return Err(StackError::Guest(format!(
                "{other:?} runs on VT-d only (no --iommu smmuv3)"
            )))
        }
    }
    Ok(out)
}

fn page_request(host: &Host, out: &mut Outcome) -> Result<(), StackError> {
    let vm = Vm::new(host, 0, RAM, 16)?;
    let b = bound(&vm, true)?;
    let _ = writeln!(
        out,
        "process {} bound to {}; buffer {} mapped lazily ({} pages resident)",
        b.process.cr3(),
        b.pasid,
        b.buffer,
        b.process.resident_pages()
    );
    let op = Operation::Fill {
        pattern: 0x5a5a_5a5a_5a5a_5a5a,
        dst: b.buffer.0,
        size: 8 * 4096,
    };
    let rec = vm.run(&b.process, b.pasid, op, b.record)?;
    let _ = writeln!(
        out,
        "device: {:?}, {} bytes; {} page requests sent",
        rec.status,
        rec.bytes_completed,
        vm.engine.stats().page_requests
    );
    let _ = writeln!(
        out,
        "physical IOMMU: {} page requests queued",
        host.iommu.stats().page_requests.load(Ordering::Relaxed)
    );
    let v = vm.viommu.stats();
    let _ = writeln!(
        out,
        "vIOMMU: {} injected into the guest's queue, {} responses forwarded to VFIO",
        v.page_requests_injected, v.page_responses_forwarded
    );
    let g = vm.driver.stats();
    let _ = writeln!(
        out,
        "guest: {} page requests read, {} served, {} page group responses",
        g.page_requests, g.page_requests_served, g.page_responses
    );
    let mut bytes = vec![0; 8 * 4096];
    b.process.read(b.buffer, &mut bytes).map_err(guest)?;
    let ok = rec.status == CompletionStatus::Success && bytes.iter().all(|&x| x == 0x5a);
    out.check(ok, || {
        format!(
            "the device's fill of a lazily mapped buffer: {:?}",
            rec.status
        )
    });
    let _ = writeln!(
        out,
        "CPU view of the buffer: {}",
        if ok {
            "filled, every byte checked"
        } else {
            "WRONG"
        }
    );
    drop(b);
    vm.shutdown()
}

fn cross_vm(host: &Host, out: &mut Outcome) -> Result<(), StackError> {
    let a = Vm::new(host, 0, RAM, 16)?;
    let b_vm = Vm::new(host, 1, RAM, 16)?;
    let victim = bound(&a, false)?;
    victim
        .process
        .write(victim.buffer, &[0x11; 4096])
        .map_err(guest)?;
    let _ = writeln!(out, "vm0 bound {}; vm1 tries it", victim.pasid);
    let free = b_vm.vfio()?.pasid_free(victim.pasid);
    let _ = writeln!(
        out,
        "vm1 VFIO_IOMMU_PASID_REQUEST(free {}): {}",
        victim.pasid,
        match &free {
            Ok(()) => "accepted (WRONG)".to_string(),
            Err(e) if e.errno() == -libc::EPERM => format!("{} ({e})", e.errno()),
            Err(e) => format!("{} ({e}) (WRONG: not -EPERM)", e.errno()),
        }
    );
    out.check(matches!(&free, Err(e) if e.errno() == -libc::EPERM), || {
        format!("vm1's free of vm0's PASID: {free:?}, not -EPERM")
    });
    // vm1's own process, with vm1's device, tagged with vm0's PASID.
    let own = bound(&b_vm, false)?;
    let rec = b_vm.run(
        &own.process,
        victim.pasid,
        Operation::Fill {
            pattern: 0,
            dst: victim.buffer.0,
            size: 4096,
        },
        own.record,
    )?;
    let swerr = b_vm.engine.software_error();
    let refused = swerr.is_some_and(|e| e.status == CompletionStatus::CompletionAddrTranslation);
    let _ = writeln!(
        out,
        "vm1 device DMA with {}: completion {:?}, software error {:?}{}",
        victim.pasid,
        rec.status,
        swerr.map(|e| e.status),
        if refused { "" } else { " (WRONG)" }
    );
    out.check(refused, || {
        format!("vm1's DMA with vm0's PASID was not refused: {rec:?}, {swerr:?}")
    });
    for f in host.unit.take_faults() {
        let _ = writeln!(
            out,
            "host fault record: sid {} reason {:#04x} address {:#x}",
            f.sid, f.reason, f.fault_info
        );
    }
    let mut bytes = [0u8; 4096];
    victim
        .process
        .read(victim.buffer, &mut bytes)
        .map_err(guest)?;
    let unchanged = bytes.iter().all(|&x| x == 0x11);
    let _ = writeln!(
        out,
        "vm0's buffer: {}",
        if unchanged {
            "unchanged"
        } else {
            "CHANGED (WRONG)"
        }
    );
    out.check(unchanged, || "vm0's buffer changed".into());
    drop(own);
    b_vm.shutdown()?;
    drop(victim);
    a.shutdown()
}

/// Boots a VM on `host`, binds and DMAs, shuts it down and checks the host holds what it
/// held `before`.
fn teardown(host: &Host, before: HostHoldings, out: &mut Outcome) -> Result<(), StackError> {
    let vm = Vm::new(host, 0, RAM, 16)?;
    let b = bound(&vm, false)?;
    let rec = vm.run(
        &b.process,
        b.pasid,
        Operation::Fill {
            pattern: 1,
            dst: b.buffer.0,
            size: 4096,
        },
        b.record,
    )?;
    let _ = writeln!(out, "vm0: {} bound, DMA {:?}", b.pasid, rec.status);
    let _ = writeln!(
        out,
        "while running: {}",
        HostHoldings::of(host).beyond(&before)
    );
    drop(b);
    vm.shutdown()?;
    let left = HostHoldings::of(host).beyond(&before);
    let _ = writeln!(
        out,
        "after shutdown: {left}{}",
        if left.is_empty() { "" } else { " (WRONG)" }
    );
    out.check(left.is_empty(), || {
        format!("the host still holds after shutdown: {left}")
    });
    Ok(())
}

fn scale() -> Result<String, StackError> {
    let report = run_scale(&ScaleConfig::ISSUE).map_err(|e| StackError::Scale(e.to_string()))?;
    let problems = report.problems();
    if problems.is_empty() {
        Ok(report.to_string())
    } else {
        Err(StackError::Scale(format!(
            "{report}\n{}",
            problems.join("\n")
        )))
    }
}

/// `vsva explain`: builds `vm + 1` VMs with a bound process each, DMAs once, and explains
/// the physical IOMMU's nested walk of `addr` in `pasid`.
pub fn explain(vm: usize, pasid: Option<u32>, addr: Option<u64>) -> Result<String, StackError> {
    let host = Host::new(HOST_MEMORY, true)?;
    let vms = (0..=vm)
        .map(|i| Vm::new(&host, i, RAM, 16))
        .collect::<Result<Vec<_>, _>>()?;
    let jobs = vms
        .iter()
        .map(|v| bound(v, false))
        .collect::<Result<Vec<_>, _>>()?;
    let (target, job) = (&vms[vm], &jobs[vm]);
    let op = Operation::Fill {
        pattern: 7,
        dst: job.buffer.0,
        size: 4096,
    };
    target.run(&job.process, job.pasid, op, job.record)?;
    let pasid = match pasid {
        Some(p) => Pasid::new(p).map_err(guest)?,
        None => job.pasid,
    };
    let addr = addr.unwrap_or(job.buffer.0);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "vm{vm}: process cr3 {} bound to {}; buffer at {}",
        job.process.cr3(),
        job.pasid,
        job.buffer
    );
    let e = host
        .iommu
        .explain(target.host_sid, Some(pasid), addr, AccessRequest::READ);
    let _ = write!(out, "{e}");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scenarios_pass_their_checks() {
        for scenario in [Scenario::PageRequest, Scenario::CrossVm, Scenario::Teardown] {
            let out = run(scenario).unwrap();
            assert!(out.passed(), "{scenario:?}: {:?}\n{}", out.failed, out.text);
            assert!(!out.text.contains("WRONG"), "{}", out.text);
        }
    }

    #[test]
    fn a_host_that_holds_more_after_teardown_fails_the_run() {
        let host = Host::new(HOST_MEMORY, true).unwrap();
        // Measured against an empty host, the driver's own tables are left over.
        let mut out = Outcome::default();
        teardown(&host, HostHoldings::default(), &mut out).unwrap();
        assert!(!out.passed(), "{}", out.text);
        assert!(out.failed[0].starts_with("the host still holds after shutdown: "));
        assert!(out.text.contains(" (WRONG)"), "{}", out.text);
    }

    /// `vsva explain` of VM 1's buffer, as it printed when the explanation moved to vtd.
    const EXPLAIN_WALK: &str = include_str!("../tests/golden/explain_walk.txt");
    /// `vsva explain --pasid 9 --addr 0x1234` of VM 0, as it printed then.
    const EXPLAIN_FAULT: &str = include_str!("../tests/golden/explain_fault.txt");

    #[test]
    fn explain_prints_the_walk_as_it_did() {
        let ok = explain(1, None, None).unwrap();
        let fault = explain(0, Some(9), Some(0x1234)).unwrap();
        assert_eq!(ok, EXPLAIN_WALK, "{ok}");
        assert_eq!(fault, EXPLAIN_FAULT, "{fault}");
    }
}
