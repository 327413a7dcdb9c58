//! `vsva demo`: one host, several VMs, each with a passthrough DMA engine and a vIOMMU;
//! in each VM several processes share their address spaces with the engine, which copies,
//! fills and compares their buffers at their own virtual addresses. Lazily mapped pages
//! are served by page requests, munmap is followed by DMA that must fault, and every VM
//! tries the next VM's PASID and must be refused. Every byte is checked against what the
//! CPU sees, every host call the vIOMMUs made must have succeeded, and after shutdown the
//! host must hold what it held before the VMs booted. Every printed count is of checks that
//! passed; every failed check is an error.
//!
//! The VMMs reach the host through one uAPI ([`DemoOptions::uapi`]): the seed's VFIO type1
//! container, or iommufd. Over iommufd the guest owns its PASID numbers, so two VMs use the
//! same numbers and there is no container to ask for another VM's PASID: the cross-VM
//! check is the device's DMA with the victim's PASID number, which must reach only the
//! attacker's own address space (the victim's bytes do not change).

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use vsva_guest::{process::Process, process::Prot};
use vsva_hw::dma::{
    CompletionRecord, CompletionRequest, CompletionStatus, Descriptor, Operation, SoftwareError,
};
use vsva_uapi::iommu::IOMMU_CACHE_INV_TYPE_IOTLB;
use vsva_uapi::{
    error::Errno, file::VfioIoctls, request::BindGpasid, request::CacheInvalidate,
    request::InvGranularity,
};
use vsva_vtd::{addr::Gpa, addr::Gva, addr::Pasid, flpte::FlPagingMode};

use crate::holdings::HostHoldings;
use crate::stack::{Host, StackError, Uapi, Vm, Vmm};

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The options ask for nothing to check.
    #[error("{0}")]
    Options(String),
    /// Building or running the stack failed.
    #[error(transparent)]
    Stack(#[from] StackError),
}

/// What the demo does.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Seed of the data and layout choices.
    pub seed: u64,
    /// VMs (at least one; the cross-VM checks need two).
    pub vms: usize,
    /// Processes per VM (at least one).
    pub processes: usize,
    /// Bytes per buffer (rounded up to whole pages).
    pub bytes: u64,
    /// Host memory (sparse).
    pub host_memory: u64,
    /// Show a progress bar.
    pub progress: bool,
    /// The uAPI the VMMs use.
    pub uapi: Uapi,
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
            uapi: Uapi::Type1,
        }
    }
}

impl DemoOptions {
    /// Refuses options under which the demo would check nothing.
    pub fn validate(&self) -> Result<(), DemoError> {
        if self.vms == 0 {
            return Err(DemoError::Options(
                "--vms 0: the demo needs at least one VM".into(),
            ));
        }
        if self.processes == 0 {
            return Err(DemoError::Options(
                "--processes 0: the demo needs at least one process per VM".into(),
            ));
        }
        Ok(())
    }
}

/// What happened in one VM.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VmReport {
    /// The VM's index, from 0.
    pub vm: usize,
    /// The PASIDs its processes were bound to.
    pub pasids: Vec<u32>,
    /// Bytes of checks that passed.
    pub bytes_verified: u64,
    /// Page requests the guest served (each answered and the DMA retried).
    pub page_requests_served: u64,
    /// Guest invalidations the vIOMMU forwarded to the host (`VFIO_IOMMU_CACHE_INVALIDATE`).
    pub invalidations_forwarded: u64,
    /// Guest PASID binds the vIOMMU made on the host (`VFIO_IOMMU_BIND`).
    pub binds: u64,
    /// DMA after munmap that faulted as it must.
    pub munmap_faults: u64,
    /// Uses of another VM's PASID that were refused as they must be (type1: -EPERM from
    /// VFIO, a translation fault from the device; iommufd: the device's DMA with the
    /// victim's PASID number left the victim's bytes as they were).
    pub cross_vm_refusals: u64,
    /// Host calls of the VM's vIOMMU that failed (each is an error).
    pub host_errors: u64,
    /// Checks that failed.
    pub errors: Vec<String>,
}

impl VmReport {
    /// Failed checks and failed host calls.
    pub fn error_count(&self) -> usize {
        self.errors.len() + self.host_errors as usize
    }
}

/// The whole run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DemoSummary {
    /// The host IOMMU.
    pub iommu: DemoIommu,
    /// The uAPI the VMMs used.
    pub uapi: Uapi,
    /// VMs booted.
    pub vms: usize,
    /// PASIDs bound across all VMs.
    pub pasids: usize,
    /// Bytes of checks that passed, across all VMs.
    pub bytes_verified: u64,
    /// Page requests served, across all VMs.
    pub page_requests_served: u64,
    /// Invalidations forwarded to the host, across all VMs.
    pub invalidations_forwarded: u64,
    /// Host calls of the vIOMMUs that failed (each is an error).
    pub host_errors: u64,
    /// Stale translations the physical IOMMU's strict mode found (each is an error).
    pub stale_translations: usize,
    /// VMs whose shutdown failed (each is an error).
    pub failed_shutdowns: usize,
    /// What the host still held after every VM shut down, beyond what it held before they
    /// booted (an error if anything).
    pub left_after_shutdown: HostHoldings,
    /// Whether the cross-VM checks ran (they need two VMs).
    pub cross_vm_checked: bool,
    /// Seconds from the start of the boot to the end of the shutdown.
    pub wall_seconds: f64,
    /// Every failed check and failed host call: the run succeeded only if this is 0.
    pub errors: usize,
    /// Each VM's report.
    pub per_vm: Vec<VmReport>,
}

/// The host IOMMU of a demo run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum DemoIommu {
    /// Intel VT-d, x86-64 guests.
    #[default]
    Vtd,
    /// Arm SMMUv3, arm64 guests ([`crate::smmu_demo`]).
    Smmuv3,
}

impl DemoSummary {
    /// The name the summary lines start with. The VT-d type1 line is the demo's line since
    /// before iommufd and SMMUv3; the others name what differs.
    fn name(&self) -> &'static str {
        match (self.iommu, self.uapi) {
            (DemoIommu::Smmuv3, Uapi::Type1) => "demo (smmuv3)",
            (DemoIommu::Smmuv3, Uapi::Iommufd) => "demo (smmuv3, iommufd)",
            (DemoIommu::Vtd, Uapi::Type1) => "demo",
            (DemoIommu::Vtd, Uapi::Iommufd) => "demo (iommufd)",
        }
    }

    /// `bytes_verified` over the wall time.
    pub fn bytes_verified_per_second(&self) -> f64 {
        self.bytes_verified as f64 / self.wall_seconds.max(f64::MIN_POSITIVE)
    }

    /// The run's wall time and rate of verified bytes, as `vsva demo` prints them.
    pub fn timing(&self) -> String {
        format!(
            "{}: wall time {:.3} s, {:.0} bytes verified per second",
            self.name(),
            self.wall_seconds,
            self.bytes_verified_per_second()
        )
    }
}

impl fmt::Display for DemoSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.name();
        write!(
            f,
            "{name}: {} VMs, {} PASIDs, {} bytes verified, {} page requests served, {} invalidations forwarded, {} errors",
            self.vms,
            self.pasids,
            self.bytes_verified,
            self.page_requests_served,
            self.invalidations_forwarded,
            self.errors
        )?;
        if !self.cross_vm_checked {
            if self.vms < 2 {
                write!(f, "; cross-VM checks skipped (they need --vms 2 or more)")?;
            } else {
                write!(f, "; cross-VM checks not run (a VM did not reach them)")?;
            }
        }
        Ok(())
    }
}

/// One process's share of the demo, kept alive (and bound) after its checks: its source
/// buffer holds `data` until the VM shuts down.
pub struct Job {
    process: Arc<Process>,
    pasid: Pasid,
    src: Gva,
    record: Gva,
    len: u64,
    data: Vec<u8>,
}

impl Job {
    /// Whether the process's source buffer still holds what it wrote there, as the CPU
    /// reads it.
    pub fn intact(&self) -> Result<bool, StackError> {
        Ok(cpu_read(&self.process, self.src, self.len)? == self.data)
    }
}

/// Runs the demo; `log` receives a line per notable event.
pub fn run(opts: &DemoOptions, log: &mut dyn FnMut(String)) -> Result<DemoSummary, DemoError> {
    Demo::boot(opts)?.run(log)
}

/// The demo's host and VMs, booted and not yet run.
pub struct Demo {
    opts: DemoOptions,
    /// When the boot began.
    started: Instant,
    host: Host,
    /// What the host held before the VMs booted.
    before: HostHoldings,
    vms: Vec<Vm>,
}

impl Demo {
    /// Boots the host and the VMs.
    pub fn boot(opts: &DemoOptions) -> Result<Demo, DemoError> {
        let started = Instant::now();
        opts.validate()?;
        let ram = vm_ram(opts);
        let host = Host::new(opts.host_memory, true)?;
        let before = HostHoldings::of(&host);
        let vms = (0..opts.vms)
            .map(|i| Vm::with_uapi(&host, i, ram, vsva_host::pasid::DEFAULT_QUOTA, opts.uapi))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Demo {
            opts: opts.clone(),
            started,
            host,
            before,
            vms,
        })
    }

    /// The host.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The VMs.
    pub fn vms(&self) -> &[Vm] {
        &self.vms
    }

    /// Runs the workload in every VM, the cross-VM checks, and shuts the VMs down;
    /// `log` receives a line per notable event.
    pub fn run(self, log: &mut dyn FnMut(String)) -> Result<DemoSummary, DemoError> {
        let Demo {
            opts,
            started,
            host,
            before,
            vms,
        } = self;
        let opts = &opts;
        let len = buffer_len(opts);
        let mut rng = StdRng::seed_from_u64(opts.seed);
        let bar = progress(opts, (opts.vms * opts.processes) as u64);
        let mut reports: Vec<VmReport> = (0..vms.len())
            .map(|vm| VmReport {
                vm,
                ..VmReport::default()
            })
            .collect();
        let mut jobs: Vec<Vec<Job>> = Vec::new();

        for (vm, report) in vms.iter().zip(&mut reports) {
            jobs.push(vm_workload(vm, opts.processes, len, &mut rng, report, &bar));
        }
        bar.finish_and_clear();

        // Every VM tries to use the next VM's PASIDs, through its container and its device.
        let cross_vm_checked = vms.len() > 1;
        if cross_vm_checked {
            for (i, vm) in vms.iter().enumerate() {
                let victim = (i + 1) % vms.len();
                for job in &jobs[victim] {
                    cross_vm(vm, &vms[victim], job, &mut reports[i]);
                }
            }
        } else {
            log("cross-VM checks skipped: they need two VMs (--vms 2 or more)".into());
        }

        for (vm, report) in vms.iter().zip(&mut reports) {
            vm_stats(vm, report, log);
        }

        let stale = host.iommu.take_stale_translations();
        for s in &stale {
            log(format!("error: {s}"));
        }
        drop(jobs);
        let mut failed_shutdowns = 0;
        for vm in vms {
            let index = vm.index;
            if let Err(e) = vm.shutdown() {
                log(format!("vm{index}: error: shutdown: {e}"));
                failed_shutdowns += 1;
            }
        }
        let left = HostHoldings::of(&host).beyond(&before);
        let released = if left.is_empty() {
            "everything released".to_string()
        } else {
            log(format!(
                "error: the host still holds after shutdown: {left}"
            ));
            format!("NOT everything released ({left})")
        };
        log(format!(
            "host: {} IOMMU walks, {} table reads, {} invalidation descriptors, {} page requests; {released}",
            host.iommu.stats().walks.load(Ordering::Relaxed),
            host.iommu.stats().table_reads.load(Ordering::Relaxed),
            host.iommu.stats().descriptors.load(Ordering::Relaxed),
            host.iommu.stats().page_requests.load(Ordering::Relaxed),
        ));

        let errors = reports.iter().map(VmReport::error_count).sum::<usize>()
            + stale.len()
            + failed_shutdowns
            + usize::from(!left.is_empty());
        Ok(DemoSummary {
            iommu: DemoIommu::Vtd,
            uapi: opts.uapi,
            vms: reports.len(),
            pasids: reports.iter().map(|r| r.pasids.len()).sum(),
            bytes_verified: reports.iter().map(|r| r.bytes_verified).sum(),
            page_requests_served: reports.iter().map(|r| r.page_requests_served).sum(),
            invalidations_forwarded: reports.iter().map(|r| r.invalidations_forwarded).sum(),
            host_errors: reports.iter().map(|r| r.host_errors).sum(),
            stale_translations: stale.len(),
            failed_shutdowns,
            left_after_shutdown: left,
            cross_vm_checked,
            wall_seconds: started.elapsed().as_secs_f64(),
            errors,
            per_vm: reports,
        })
    }
}

/// One VM's share of the demo: `processes` processes (four-level and five-level paging
/// in turn) each run `process_workload`; returns their jobs, still bound.
pub fn vm_workload(
    vm: &Vmm,
    processes: usize,
    len: u64,
    rng: &mut StdRng,
    report: &mut VmReport,
    bar: &ProgressBar,
) -> Vec<Job> {
    let mut jobs = Vec::new();
    for n in 0..processes {
        bar.set_message(format!("vm{} process {n}", vm.index));
        let mode = if n % 2 == 0 {
            FlPagingMode::FourLevel
        } else {
            FlPagingMode::FiveLevel
        };
        match process_workload(vm, mode, len, rng, report) {
            Ok(job) => jobs.push(job),
            Err(e) => report.errors.push(format!("process {n}: {e}")),
        }
        bar.inc(1);
    }
    jobs
}

/// Completes `report` with the VM's vIOMMU and guest driver counts and logs the VM's
/// line of the demo and its errors.
pub fn vm_stats(vm: &Vmm, report: &mut VmReport, log: &mut dyn FnMut(String)) {
    let stats = vm.viommu.stats();
    report.invalidations_forwarded = stats.invalidations_forwarded;
    report.binds = stats.binds;
    report.host_errors = stats.host_errors;
    report.page_requests_served = vm.driver.stats().page_requests_served;
    log(format!(
        "vm{}: {} processes bound to PASIDs {:?}; {} bytes verified; {} page requests served; {} invalidations forwarded; {} munmap faults and {} cross-VM refusals as expected; {} failed host calls; {} errors",
        report.vm,
        report.pasids.len(),
        report.pasids,
        report.bytes_verified,
        report.page_requests_served,
        report.invalidations_forwarded,
        report.munmap_faults,
        report.cross_vm_refusals,
        report.host_errors,
        report.error_count()
    ));
    for e in &report.errors {
        log(format!("vm{}: error: {e}", report.vm));
    }
    for e in vm.viommu.take_host_errors() {
        log(format!("vm{}: error: vIOMMU host call: {e}", report.vm));
    }
}

/// Guest RAM per VM: each process maps four buffers plus tables, with room for the guest
/// kernel's own; whole 2 MiB.
pub fn vm_ram(opts: &DemoOptions) -> u64 {
    let len = buffer_len(opts);
    ((opts.processes as u64 * (len * 4 + (1 << 20)) + (32 << 20)) + (2 << 20) - 1)
        & !((2 << 20) - 1)
}

/// Bytes per buffer: whole pages, at least one.
pub fn buffer_len(opts: &DemoOptions) -> u64 {
    opts.bytes.div_ceil(4096).max(1) * 4096
}

/// The demo's progress bar (hidden unless `opts.progress`).
pub fn progress(opts: &DemoOptions, steps: u64) -> ProgressBar {
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

/// Records a failed check as an error of the VM; returns whether the check passed.
fn expect(report: &mut VmReport, what: &str, ok: bool, detail: impl FnOnce() -> String) -> bool {
    if !ok {
        report.errors.push(format!("{what}: {}", detail()));
    }
    ok
}

fn success(rec: &CompletionRecord) -> bool {
    rec.status == CompletionStatus::Success
}

/// A compare of buffers that differ first at byte `at` completed and says so: unequal,
/// with `at` bytes compared equal.
fn found_difference_at(rec: &CompletionRecord, at: u64) -> bool {
    success(rec) && rec.result == 1 && u64::from(rec.bytes_completed) == at
}

/// One process: map buffers (one lazily), bind, copy, fill, compare, munmap and fault.
fn process_workload(
    vm: &Vmm,
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
    if expect(report, "memmove", success(&rec) && copied == data, || {
        format!("{rec:?}")
    }) {
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
    if expect(
        report,
        "fill of lazily mapped pages",
        success(&rec) && ok,
        || format!("{rec:?}"),
    ) {
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
    if expect(
        report,
        "compare after a CPU write",
        found_difference_at(&rec, at),
        || format!("difference at {at}, device says {rec:?}"),
    ) {
        report.bytes_verified += at;
    }

    // munmap: the guest driver invalidates; DMA to the range must now fault.
    p.munmap(dst, len).map_err(guest)?;
    let rec = vm.run(&p, pasid, copy, record)?;
    let faulted = rec.status == CompletionStatus::PageResponseError && rec.fault_addr == dst.0;
    if expect(report, "DMA after munmap", faulted, || format!("{rec:?}")) {
        report.munmap_faults += 1;
    }

    Ok(Job {
        process: p,
        pasid,
        src,
        record,
        len,
        data,
    })
}

/// Another VM's process as a VM is told to attack it: the victim's PASID, its page table
/// root and the GVAs of its source buffer and completion record (in the victim's address
/// space). `vsva demo --split` sends it from one VM process to another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// The victim VM's index.
    pub vm: usize,
    /// The PASID the victim's process is bound to.
    pub pasid: u32,
    /// The GPA of the process's first-level page table (its CR3).
    pub gpgd: u64,
    /// The GVA of its source buffer.
    pub src: u64,
    /// The buffer's length in bytes.
    pub len: u64,
    /// The GVA of its completion record.
    pub record: u64,
}

impl Job {
    /// The job as another VM's target, `vm` being the job's own VM.
    pub fn target(&self, vm: usize) -> Target {
        Target {
            vm,
            pasid: self.pasid.raw(),
            gpgd: self.process.cr3().0,
            src: self.src.0,
            len: self.len,
            record: self.record.0,
        }
    }

    /// The process's source buffer as the CPU reads it now.
    pub fn snapshot(&self) -> Result<Vec<u8>, StackError> {
        cpu_read(&self.process, self.src, self.len)
    }
}

/// `vm` tries `victim`'s PASID through its VFIO container (type1) and through its own
/// device; every attempt must be refused, and the victim's bytes must not change.
fn cross_vm(vm: &Vm, victim: &Vm, job: &Job, report: &mut VmReport) {
    let before = job.snapshot();
    let attempt = attack(vm, vm.uapi(), &job.target(victim.index), report);
    let after = job.snapshot();
    let unchanged = before.is_ok() && before.ok() == after.ok();
    attempt.judge(unchanged, report);
}

/// `vm`, over `uapi`, tries `target`'s PASID: over type1 its VFIO container is asked to
/// bind, invalidate and free it (each must be -EPERM, counted in `report` at once); then
/// its own device DMAs with it. The device's attempt is judged by
/// [`DeviceAttempt::judge`] once the victim's bytes have been compared.
pub fn attack(vm: &Vmm, uapi: Uapi, target: &Target, report: &mut VmReport) -> DeviceAttempt {
    match Pasid::new(target.pasid) {
        Ok(pasid) => {
            if uapi == Uapi::Type1 {
                attack_container(vm, pasid, target, report);
            }
            attack_device(vm, uapi, pasid, target)
        }
        Err(e) => DeviceAttempt {
            uapi,
            victim: target.vm,
            ran: Err(format!("PASID {}: {e}", target.pasid)),
            swerr: None,
        },
    }
}

/// `vm`'s VFIO container asked to bind, invalidate and free another VM's PASID: each
/// must be -EPERM.
fn attack_container(vm: &Vmm, pasid: Pasid, target: &Target, report: &mut VmReport) {
    let bind = BindGpasid {
        hpasid: pasid,
        gpasid: Some(pasid),
        gpgd: Gpa(target.gpgd),
        addr_width: 48,
        vtd_flags: 0,
        pat: 0,
        emt: 0,
    };
    let inv = CacheInvalidate {
        cache: IOMMU_CACHE_INV_TYPE_IOTLB,
        granularity: InvGranularity::Pasid {
            pasid: Some(pasid),
            archid: None,
        },
    };
    let mut vfio = &*vm.file;
    let attempts = [
        ("bind of another VM's PASID", vfio.bind_gpasid(&bind)),
        (
            "invalidation of another VM's PASID",
            vfio.cache_invalidate(&inv),
        ),
        ("free of another VM's PASID", vfio.pasid_free(pasid)),
    ];
    for (what, result) in attempts {
        if expect(report, what, result == Err(Errno::EPERM), || {
            format!("{result:?}, not -EPERM")
        }) {
            report.cross_vm_refusals += 1;
        }
    }
}

/// `vm`'s own device, tagged with the victim's PASID, fills the victim's buffer's GVA.
/// Over type1 the IOMMU has no such PASID for this device, so the DMA faults (and so does
/// its completion record, which the device then reports in its software error register)
/// without touching the victim. Over iommufd the VM holds the same PASID number for a
/// process of its own (guest-owned numbers): the DMA runs in that address space, through
/// this device's PASID table, and must not touch the victim either. The software error
/// register is cleared first, so what it holds after is this DMA's.
fn attack_device(vm: &Vmm, uapi: Uapi, pasid: Pasid, target: &Target) -> DeviceAttempt {
    let desc = Descriptor {
        pasid: Some(pasid),
        privileged: false,
        block_on_fault: true,
        completion: CompletionRequest::Always(target.record),
        op: Operation::Fill {
            pattern: 0xbad,
            dst: target.src,
            size: target.len as u32,
        },
    };
    let ran = vm
        .take_software_error()
        .and_then(|_| vm.device.portal_write(0, &desc.encode()))
        .and_then(|()| vm.run_device())
        .and_then(|()| vm.take_software_error());
    let (ran, swerr) = match ran {
        Ok(swerr) => (Ok(()), swerr),
        Err(e) => (Err(e.to_string()), None),
    };
    DeviceAttempt {
        uapi,
        victim: target.vm,
        ran,
        swerr,
    }
}

/// A VM's device DMA with another VM's PASID, waiting to be judged against the victim's
/// bytes.
#[derive(Debug)]
pub struct DeviceAttempt {
    uapi: Uapi,
    victim: usize,
    /// Whether the device ran to completion (the error if not).
    ran: Result<(), String>,
    /// The software error the device reported for the DMA.
    swerr: Option<SoftwareError>,
}

impl DeviceAttempt {
    /// Counts the attempt in `report`: refused as it must be (type1: the device ran and
    /// reported the untranslatable completion record; iommufd: it ran and the victim's
    /// bytes are `unchanged`), and the victim's bytes unchanged.
    pub fn judge(self, unchanged: bool, report: &mut VmReport) {
        let refused = match self.uapi {
            Uapi::Type1 => {
                self.ran.is_ok()
                    && self
                        .swerr
                        .is_some_and(|e| e.status == CompletionStatus::CompletionAddrTranslation)
            }
            Uapi::Iommufd => self.ran.is_ok() && unchanged,
        };
        if expect(report, "DMA with another VM's PASID", refused, || {
            format!("{:?}, {:?}", self.ran, self.swerr)
        }) {
            report.cross_vm_refusals += 1;
        }
        expect(report, "victim's buffer unchanged", unchanged, || {
            format!("vm{}'s buffer changed", self.victim)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_compare_is_verified_only_when_it_reports_the_difference_where_it_is() {
        let rec = |status, result, bytes_completed| CompletionRecord {
            result,
            bytes_completed,
            ..CompletionRecord::new(status)
        };
        assert!(found_difference_at(
            &rec(CompletionStatus::Success, 1, 100),
            100
        ));
        // Unequal, but at the wrong byte; equal; or not completed.
        assert!(!found_difference_at(
            &rec(CompletionStatus::Success, 1, 99),
            100
        ));
        assert!(!found_difference_at(
            &rec(CompletionStatus::Success, 0, 100),
            100
        ));
        assert!(!found_difference_at(
            &rec(CompletionStatus::PageResponseError, 1, 100),
            100
        ));
    }

    #[test]
    fn only_eperm_counts_as_a_cross_vm_refusal() {
        let demo = Demo::boot(&DemoOptions {
            vms: 1,
            processes: 1,
            bytes: 4096,
            host_memory: 1 << 30,
            progress: false,
            ..DemoOptions::default()
        })
        .unwrap();
        let vm = &demo.vms()[0];
        let mut rng = StdRng::seed_from_u64(1);
        let mut report = VmReport::default();
        let job =
            process_workload(vm, FlPagingMode::FourLevel, 4096, &mut rng, &mut report).unwrap();
        assert_eq!(report.errors, Vec::<String>::new());
        // The VM "attacks" its own PASID: its container answers, but not with -EPERM (the
        // bind is refused with -EBUSY as a second bind, the invalidation and the free
        // succeed). None of that is a refusal; only the device's DMA, with the PASID now
        // freed, faults as a refusal must.
        cross_vm(vm, vm, &job, &mut report);
        assert_eq!(report.cross_vm_refusals, 1, "{:?}", report.errors);
        assert!(
            report
                .errors
                .iter()
                .any(|e| e.starts_with("bind of another VM's PASID: Err(")
                    && e.ends_with("not -EPERM")),
            "{:?}",
            report.errors
        );
    }
}
