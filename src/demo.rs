//! `vsva demo`: one host, several VMs, each with a passthrough DMA engine and a vIOMMU;
//! in each VM several processes share their address spaces with the engine, which copies,
//! fills and compares their buffers at their own virtual addresses. Lazily mapped pages
//! are served by page requests, munmap is followed by DMA that must fault, and every VM
//! tries the next VM's PASID and must be refused. Every byte is checked against what the
//! CPU sees.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use vsva_guest::{Process, Prot};
use vsva_hw::dma::{CompletionRecord, CompletionRequest, CompletionStatus, Descriptor, Operation};
use vsva_uapi::iommu::IOMMU_CACHE_INV_TYPE_IOTLB;
use vsva_uapi::{BindGpasid, CacheInvalidate, InvGranularity};
use vsva_vtd::{FlPagingMode, Gva, Pasid};

use crate::stack::{Host, StackError, Vm};

/// What the demo does.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Seed of the data and layout choices.
    pub seed: u64,
    pub vms: usize,
    /// Processes per VM.
    pub processes: usize,
    /// Bytes per buffer (rounded up to whole pages).
    pub bytes: u64,
    /// Host memory (sparse).
    pub host_memory: u64,
    /// Show a progress bar.
    pub progress: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            seed: 1,
            vms: 2,
            processes: 3,
            bytes: 256 << 10,
            host_memory: vsva_hw::memory::DEFAULT_HOST_MEMORY,
            progress: true,
        }
    }
}

/// What happened in one VM.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VmReport {
    pub vm: usize,
    pub pasids: Vec<u32>,
    pub bytes_verified: u64,
    pub page_requests_served: u64,
    pub invalidations_forwarded: u64,
    pub binds: u64,
    /// DMA after munmap that faulted as it must.
    pub munmap_faults: u64,
    /// Uses of another VM's PASID that were refused.
    pub cross_vm_refusals: u64,
    pub errors: Vec<String>,
}

/// The whole run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DemoSummary {
    pub vms: usize,
    pub pasids: usize,
    pub bytes_verified: u64,
    pub page_requests_served: u64,
    pub invalidations_forwarded: u64,
    /// Stale translations the physical IOMMU's strict mode found (each is an error).
    pub stale_translations: usize,
    /// Host memory still allocated after every VM shut down (an error if not zero).
    pub leaked_bytes: u64,
    pub errors: usize,
    pub per_vm: Vec<VmReport>,
}

impl fmt::Display for DemoSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "demo: {} VMs, {} PASIDs, {} bytes verified, {} page requests served, {} invalidations forwarded, {} errors",
            self.vms,
            self.pasids,
            self.bytes_verified,
            self.page_requests_served,
            self.invalidations_forwarded,
            self.errors
        )
    }
}

/// One process's share of the demo.
struct Job {
    process: Arc<Process>,
    pasid: Pasid,
    src: Gva,
    record: Gva,
    len: u64,
}

/// Runs the demo; `log` receives a line per notable event.
pub fn run(opts: &DemoOptions, log: &mut dyn FnMut(String)) -> Result<DemoSummary, StackError> {
    let len = opts.bytes.div_ceil(4096).max(1) * 4096;
    // Each process maps four buffers plus tables; leave room for the guest kernel's own.
    let ram = ((opts.processes as u64 * (len * 4 + (1 << 20)) + (32 << 20)) + (2 << 20) - 1)
        & !((2 << 20) - 1);
    let host = Host::new(opts.host_memory, true)?;
    let baseline = host.frames.allocated_bytes();
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let bar = progress(opts, (opts.vms * opts.processes) as u64);

    let vms = (0..opts.vms)
        .map(|i| Vm::new(&host, i, ram, vsva_host::DEFAULT_QUOTA))
        .collect::<Result<Vec<_>, _>>()?;
    let mut reports: Vec<VmReport> = (0..opts.vms)
        .map(|vm| VmReport {
            vm,
            ..VmReport::default()
        })
        .collect();
    let mut jobs: Vec<Vec<Job>> = Vec::new();

    for (vm, report) in vms.iter().zip(&mut reports) {
        let mut vm_jobs = Vec::new();
        for n in 0..opts.processes {
            bar.set_message(format!("vm{} process {n}", vm.index));
            let mode = if n % 2 == 0 {
                FlPagingMode::FourLevel
            } else {
                FlPagingMode::FiveLevel
            };
            match process_workload(vm, mode, len, &mut rng, report) {
                Ok(job) => vm_jobs.push(job),
                Err(e) => report.errors.push(format!("process {n}: {e}")),
            }
            bar.inc(1);
        }
        jobs.push(vm_jobs);
    }
    bar.finish_and_clear();

    // Every VM tries to use the next VM's PASIDs, through its container and its device.
    if vms.len() > 1 {
        for (i, vm) in vms.iter().enumerate() {
            let victim = (i + 1) % vms.len();
            for job in &jobs[victim] {
                cross_vm(vm, &vms[victim], job, &mut reports[i]);
            }
        }
    }

    for (vm, report) in vms.iter().zip(&mut reports) {
        let stats = vm.viommu.stats();
        report.invalidations_forwarded = stats.invalidations_forwarded;
        report.binds = stats.binds;
        report.page_requests_served = vm.driver.stats().page_requests_served;
        log(format!(
            "vm{}: {} processes bound to PASIDs {:?}; {} bytes verified; {} page requests served; {} invalidations forwarded; {} munmap faults and {} cross-VM refusals as expected; {} errors",
            report.vm,
            report.pasids.len(),
            report.pasids,
            report.bytes_verified,
            report.page_requests_served,
            report.invalidations_forwarded,
            report.munmap_faults,
            report.cross_vm_refusals,
            report.errors.len()
        ));
        for e in &report.errors {
            log(format!("vm{}: error: {e}", report.vm));
        }
    }

    let stale = host.iommu.take_stale_translations();
    for s in &stale {
        log(format!("error: {s}"));
    }
    drop(jobs);
    for vm in vms {
        vm.shutdown()?;
    }
    let leaked_bytes = host.frames.allocated_bytes().saturating_sub(baseline);
    if leaked_bytes > 0 {
        log(format!(
            "error: {leaked_bytes} bytes of host memory still allocated after shutdown"
        ));
    }
    log(format!(
        "host: {} IOMMU walks, {} table reads, {} invalidation descriptors, {} page requests; everything released",
        host.iommu.stats().walks.load(Ordering::Relaxed),
        host.iommu.stats().table_reads.load(Ordering::Relaxed),
        host.iommu.stats().descriptors.load(Ordering::Relaxed),
        host.iommu.stats().page_requests.load(Ordering::Relaxed),
    ));

    let errors = reports.iter().map(|r| r.errors.len()).sum::<usize>()
        + stale.len()
        + usize::from(leaked_bytes > 0);
    Ok(DemoSummary {
        vms: reports.len(),
        pasids: reports.iter().map(|r| r.pasids.len()).sum(),
        bytes_verified: reports.iter().map(|r| r.bytes_verified).sum(),
        page_requests_served: reports.iter().map(|r| r.page_requests_served).sum(),
        invalidations_forwarded: reports.iter().map(|r| r.invalidations_forwarded).sum(),
        stale_translations: stale.len(),
        leaked_bytes,
        errors,
        per_vm: reports,
    })
}

fn progress(opts: &DemoOptions, steps: u64) -> ProgressBar {
    if !opts.progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(steps);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}").expect("a valid template"),
    );
    bar
}

fn guest<E: fmt::Display>(e: E) -> StackError {
    StackError::Guest(e.to_string())
}

/// Reads `len` bytes of a process buffer through the CPU's view of its page tables.
fn cpu_read(p: &Process, gva: Gva, len: u64) -> Result<Vec<u8>, StackError> {
    let mut buf = vec![0; len as usize];
    p.read(gva, &mut buf).map_err(guest)?;
    Ok(buf)
}

/// Records a failed check as an error of the VM.
fn expect(report: &mut VmReport, what: &str, ok: bool, detail: impl FnOnce() -> String) {
    if !ok {
        report.errors.push(format!("{what}: {}", detail()));
    }
}

fn success(rec: &CompletionRecord) -> bool {
    rec.status == CompletionStatus::Success
}

/// One process: map buffers (one lazily), bind, copy, fill, compare, munmap and fault.
fn process_workload(
    vm: &Vm,
    mode: FlPagingMode,
    len: u64,
    rng: &mut StdRng,
    report: &mut VmReport,
) -> Result<Job, StackError> {
    let p = vm.spawn(mode)?;
    let src = p.mmap(len, Prot::READ_WRITE).map_err(guest)?;
    let dst = p.mmap(len, Prot::READ_WRITE).map_err(guest)?;
    let lazy = p.mmap_lazy(len, Prot::READ_WRITE).map_err(guest)?;
    let record = p.mmap(4096, Prot::READ_WRITE).map_err(guest)?;
    let pasid = vm.bind(&p)?;
    report.pasids.push(pasid.raw());

    let mut data = vec![0u8; len as usize];
    rng.fill_bytes(&mut data);
    p.write(src, &data).map_err(guest)?;

    let size = len as u32;
    let copy = Operation::Memmove {
        src: src.0,
        dst: dst.0,
        size,
    };
    let compare = Operation::Compare {
        src1: src.0,
        src2: dst.0,
        size,
    };

    // Copy: the device reads and writes the process's buffers at their GVAs.
    let rec = vm.run(&p, pasid, copy, record)?;
    let copied = cpu_read(&p, dst, len)?;
    expect(report, "memmove", success(&rec) && copied == data, || {
        format!("{rec:?}")
    });
    if copied == data {
        report.bytes_verified += len;
    }

    // Fill a buffer that has no pages yet: each first touch is a page request served by
    // the guest through the host, the VMM and the vIOMMU.
    let pattern: u64 = rng.next_u64();
    let rec = vm.run(
        &p,
        pasid,
        Operation::Fill {
            pattern,
            dst: lazy.0,
            size: len as u32,
        },
        record,
    )?;
    let filled = cpu_read(&p, lazy, len)?;
    let want = pattern.to_le_bytes();
    let ok = filled.chunks(8).all(|c| c == want);
    expect(
        report,
        "fill of lazily mapped pages",
        success(&rec) && ok,
        || format!("{rec:?}"),
    );
    if ok {
        report.bytes_verified += len;
    }

    // Compare equal buffers, then after the CPU changed one byte.
    let rec = vm.run(&p, pasid, compare, record)?;
    expect(
        report,
        "compare of equal buffers",
        success(&rec) && rec.result == 0,
        || format!("{rec:?}"),
    );
    let at = rng.next_u64() % len;
    p.write(Gva(dst.0 + at), &[data[at as usize] ^ 0x5a])
        .map_err(guest)?;
    let rec = vm.run(&p, pasid, compare, record)?;
    expect(
        report,
        "compare after a CPU write",
        rec.result == 1 && u64::from(rec.bytes_completed) == at,
        || format!("difference at {at}, device says {rec:?}"),
    );
    if rec.result == 1 {
        report.bytes_verified += at;
    }

    // munmap: the guest driver invalidates; DMA to the range must now fault.
    p.munmap(dst, len).map_err(guest)?;
    let rec = vm.run(&p, pasid, copy, record)?;
    let faulted = rec.status == CompletionStatus::PageResponseError && rec.fault_addr == dst.0;
    expect(report, "DMA after munmap", faulted, || format!("{rec:?}"));
    report.munmap_faults += u64::from(faulted);

    Ok(Job {
        process: p,
        pasid,
        src,
        record,
        len,
    })
}

/// `vm` tries `victim`'s PASID through its VFIO container and through its own device;
/// every attempt must be refused, and the victim's bytes must not change.
fn cross_vm(vm: &Vm, victim: &Vm, job: &Job, report: &mut VmReport) {
    let before = cpu_read(&job.process, job.src, job.len);
    let bind = BindGpasid {
        hpasid: job.pasid,
        gpasid: Some(job.pasid),
        gpgd: job.process.cr3(),
        addr_width: 48,
        vtd_flags: 0,
        pat: 0,
        emt: 0,
    };
    let inv = CacheInvalidate {
        cache: IOMMU_CACHE_INV_TYPE_IOTLB,
        granularity: InvGranularity::Pasid {
            pasid: Some(job.pasid),
            archid: None,
        },
    };
    let mut vfio = vm.vfio();
    let attempts = [
        ("bind of another VM's PASID", vfio.bind_gpasid(&bind)),
        (
            "invalidation of another VM's PASID",
            vfio.cache_invalidate(&inv),
        ),
        ("free of another VM's PASID", vfio.pasid_free(job.pasid)),
    ];
    drop(vfio);
    for (what, result) in attempts {
        let refused = result.map_err(|e| e.errno());
        expect(report, what, refused == Err(-libc::EPERM), || {
            format!("{refused:?}")
        });
        report.cross_vm_refusals += u64::from(refused.is_err());
    }

    // The VM's own device, tagged with the victim's PASID: the IOMMU has no such PASID
    // for this device, so the DMA faults (and so does its completion record, which the
    // device then reports in its software error register) without touching the victim.
    let desc = Descriptor {
        pasid: Some(job.pasid),
        privileged: false,
        block_on_fault: true,
        completion: CompletionRequest::Always(job.record.0),
        op: Operation::Fill {
            pattern: 0xbad,
            dst: job.src.0,
            size: job.len as u32,
        },
    };
    let ran = vm
        .engine
        .portal_write(0, &desc.encode())
        .map_err(StackError::from)
        .and_then(|()| vm.run_device());
    let swerr = vm.engine.software_error();
    let refused = ran.is_ok()
        && swerr.is_some_and(|e| e.status == CompletionStatus::CompletionAddrTranslation);
    expect(report, "DMA with another VM's PASID", refused, || {
        format!("{ran:?}, {swerr:?}")
    });
    report.cross_vm_refusals += u64::from(refused);
    let after = cpu_read(&job.process, job.src, job.len);
    expect(
        report,
        "victim's buffer unchanged",
        before.is_ok() && before.ok() == after.ok(),
        || format!("vm{}'s buffer changed", victim.index),
    );
}
