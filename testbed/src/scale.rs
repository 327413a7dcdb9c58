//! The scale scenario of issue 6: as many VMs as the PASID space holds, each with its full
//! quota, through the real ioctl path and the real VT-d driver on the IOMMU model; then a
//! thousand VMs with ten thousand bound PASIDs; set-up and teardown timed, memory measured,
//! and every teardown checked for leaks.
//!
//! The space has `2^20 - 1` PASIDs (PASID 0 is RID_PASID). With the default quota of 1,000,
//! 1,048 VMs hold 1,048,000 of them; 575 stay free, so a 1,049th VM gets 575 PASIDs and then
//! `-ENOSPC`: no VM beyond the 1,048th can hold its full quota.
//!
//! [`run_scale`] measures; it asserts nothing. Its [`ScaleReport`] says what happened, and
//! [`ScaleReport::problems`] lists every outcome that differs from what the scenario
//! expects (a leak, an extra VM that was not refused with `-ENOSPC`, a refusal that
//! changed something).

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vsva_hw::dma::{DmaEngine, DmaEngineConfig, DmaPort};
use vsva_hw::iommu::{Iommu, IommuConfig};
use vsva_hw::{memory::FrameAllocator, memory::HostMemory, memory::HostMemoryError};
use vsva_vtd::{addr::Gpa, addr::Iova, addr::Pasid, addr::SourceId};

use vsva_host::container::{Container, SharedPasidAllocator};
use vsva_host::driver::{DriverError, HostIommu, VtdDomain, ADDR_WIDTH_4LEVEL};
use vsva_host::error::HostError;
use vsva_host::pasid::{PasidAllocator, DEFAULT_QUOTA};
use vsva_uapi::request::{BindGpasid, DmaMap};
use vsva_uapi::{file::IommuModel, file::VfioIoctls};

/// The guest page-table root every bound PASID points to: one tiny table shared by all
/// (binding does not walk it; a DMA would, through each VM's second level).
const SHARED_GUEST_TABLE: Gpa = Gpa(0x1000);

/// The guest RAM every bound VM maps at GPA 0 before binding, holding the shared table
/// (the host refuses a table beyond the end of the VM's highest mapping, as Linux does).
const SHARED_GUEST_RAM: u64 = 0x2000;

/// Host memory for the scenario: sparse, so only the frames the driver writes cost RSS.
const HOST_MEMORY: u64 = 8 << 30;

/// What to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScaleConfig {
    /// Each VM's PASID quota, all of which it allocates.
    pub quota: u32,
    /// VMs of the first scenario, which fills the space.
    pub full_vms: usize,
    /// The highest PASID the first scenario's VMs allocate (`VFIO_IOMMU_PASID_REQUEST`
    /// range `[1, max]`): `0xfffff` for the whole space; lower to fill a smaller range. The
    /// second scenario allocates from the whole space.
    pub pasid_max: u32,
    /// VMs of the second scenario, each with a device and `bound_per_vm` bound PASIDs.
    pub bound_vms: usize,
    /// Bound PASIDs per VM in the second scenario.
    pub bound_per_vm: usize,
}

impl ScaleConfig {
    /// Issue 6: 1,048 VMs × 1,000 PASIDs (the whole space but 575), then 1,000 VMs × 1,000
    /// PASIDs with 10,000 bound.
    pub const ISSUE: ScaleConfig = ScaleConfig {
        quota: DEFAULT_QUOTA,
        full_vms: 1048,
        pasid_max: Pasid::MAX.raw(),
        bound_vms: 1000,
        bound_per_vm: 10,
    };

    /// The same shape, small: 20 VMs × 50 PASIDs in `[1, 1010]` (10 left for the extra VM),
    /// then 20 VMs × 50 PASIDs with 5 bound each.
    pub const SMALL: ScaleConfig = ScaleConfig {
        quota: 50,
        full_vms: 20,
        pasid_max: 1010,
        bound_vms: 20,
        bound_per_vm: 5,
    };

    /// PASIDs the first scenario's range holds: `[1, pasid_max]`.
    pub fn space(&self) -> u64 {
        u64::from(self.pasid_max)
    }
}

/// Why the scenario could not run.
#[derive(Debug, thiserror::Error)]
pub enum ScaleError {
    #[error("host memory: {0}")]
    /// The sparse host memory could not be created.
    Memory(#[from] HostMemoryError),
    #[error("IOMMU model: {0}")]
    /// The IOMMU model refused its configuration.
    Iommu(#[from] vsva_hw::iommu::IommuConfigError),
    #[error("DMA engine: {0}")]
    /// A VM's device model refused its configuration.
    Device(#[from] vsva_hw::dma::DmaError),
    #[error("VT-d driver: {0}")]
    /// The host VT-d driver could not bring the unit up.
    Driver(#[from] DriverError),
    #[error("{what}: {err} ({})", err.errno())]
    /// A host call the scenario needs failed: `what` names the step, `err` is the error.
    Host {
        /// The step that failed.
        what: &'static str,
        /// The host's error.
        err: HostError,
    },
}

fn host_err(what: &'static str) -> impl FnOnce(HostError) -> ScaleError {
    move |err| ScaleError::Host { what, err }
}

/// What the host holds, for leak checks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// PASIDs allocated across all sets.
    pub pasids: usize,
    /// Host memory the driver holds for tables and queues.
    pub table_bytes: u64,
    /// Domain ids in use.
    pub domain_ids: usize,
    /// Devices attached to a domain.
    pub devices: usize,
    /// (device, PASID) pairs whose page requests go to a container.
    pub page_request_routes: usize,
    /// IOTLB entries.
    pub iotlb_entries: usize,
    /// Context-cache and PASID-cache entries.
    pub cached_entries: (usize, usize),
}

/// Durations of a series of like operations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timing {
    /// How many operations were timed.
    pub count: usize,
    /// Their summed duration.
    pub total: Duration,
    /// The longest one.
    pub max: Duration,
}

impl Timing {
    fn add(&mut self, d: Duration) {
        self.count += 1;
        self.total += d;
        self.max = self.max.max(d);
    }

    /// The mean duration (zero for no operation).
    pub fn mean(&self) -> Duration {
        match u32::try_from(self.count) {
            Ok(n) if n > 0 => self.total / n,
            _ => Duration::ZERO,
        }
    }
}

/// The VM beyond the ones that fit: how many PASIDs it got before the refusal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtraVm {
    /// PASIDs allocated before the first refusal.
    pub allocated: u32,
    /// The refusal; `None` if the VM got its whole quota.
    pub refusal: Option<HostError>,
    /// Whether the refused call left the allocator and the container as they were.
    pub refusal_changed_nothing: bool,
}

/// The first scenario: VMs fill the PASID space with their full quotas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FullSpaceReport {
    /// VMs that hold their full quota.
    pub vms: usize,
    /// PASIDs each of them holds (its quota).
    pub pasids_per_vm: u32,
    /// PASIDs allocated once every VM holds its quota.
    pub pasids_allocated: usize,
    /// Creating the containers (with their domains) and allocating every PASID through
    /// `VFIO_IOMMU_PASID_REQUEST`.
    pub setup: Duration,
    /// The allocations alone, one ioctl each.
    pub alloc: Timing,
    /// Resident memory of the process after set-up, and its growth during set-up.
    pub rss_bytes: u64,
    /// How much the resident memory grew during set-up.
    pub rss_growth_bytes: u64,
    /// Host memory the driver holds for the VMs' domains.
    pub table_bytes: u64,
    /// The VM beyond the space: how far it got and how it was refused.
    pub extra_vm: ExtraVm,
    /// Closing each VM.
    pub teardown: Timing,
    /// The host before the VMs, and after they are all closed.
    pub before: Usage,
    /// The host after every VM closed (must equal `before`).
    pub after: Usage,
}

/// The second scenario: VMs with devices and bound PASIDs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundReport {
    /// VMs, each with one device.
    pub vms: usize,
    /// PASIDs each VM allocates.
    pub pasids_per_vm: u32,
    /// PASIDs bound (nested PASID entries written) across all VMs.
    pub bound: usize,
    /// Creating the containers, attaching a device to each, allocating every PASID and
    /// binding the bound ones.
    pub setup: Duration,
    /// The binds alone (`VFIO_IOMMU_BIND`: nested PASID entry and its invalidations).
    pub bind: Timing,
    /// Resident memory of the process after set-up.
    pub rss_bytes: u64,
    /// How much the resident memory grew during set-up.
    pub rss_growth_bytes: u64,
    /// Host memory the driver holds for the VMs (PASID directories and tables, second
    /// levels).
    pub table_bytes: u64,
    /// One more VM like the others, set up when all are there and then closed alone.
    pub one_vm_teardown: Duration,
    /// The host before that VM and after it closed.
    pub one_vm_before: Usage,
    /// The host after that VM closed (must equal `one_vm_before`).
    pub one_vm_after: Usage,
    /// Closing each VM.
    pub teardown: Timing,
    /// The host before the VMs.
    pub before: Usage,
    /// The host after every VM closed (must equal `before`).
    pub after: Usage,
}

/// Everything [`run_scale`] measured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScaleReport {
    /// What was run.
    pub config: ScaleConfig,
    /// The PASID space filled with VMs at their full quota.
    pub full: FullSpaceReport,
    /// VMs with devices and bound PASIDs.
    pub bound: BoundReport,
}

impl ScaleReport {
    /// Every outcome that differs from what the scenario expects; empty when all is well.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let f = &self.full;
        let expected = f.vms * f.pasids_per_vm as usize;
        if f.pasids_allocated != expected {
            p.push(format!(
                "full space: {} PASIDs allocated, {expected} expected",
                f.pasids_allocated
            ));
        }
        let left = self.config.space().saturating_sub(expected as u64);
        if left < u64::from(self.config.quota) {
            match &f.extra_vm.refusal {
                Some(e) if e.errno() == -libc::ENOSPC => {}
                Some(e) => p.push(format!("extra VM refused with {e} ({})", e.errno())),
                None => p.push("extra VM got its whole quota".into()),
            }
            if u64::from(f.extra_vm.allocated) != left {
                p.push(format!(
                    "extra VM got {} PASIDs, {left} were free",
                    f.extra_vm.allocated
                ));
            }
            if !f.extra_vm.refusal_changed_nothing {
                p.push("the extra VM's refused allocation changed something".into());
            }
        }
        if f.after != f.before {
            p.push(format!(
                "full space: leaked {:?} (before {:?})",
                f.after, f.before
            ));
        }
        let b = &self.bound;
        if b.one_vm_after != b.one_vm_before {
            p.push(format!(
                "one VM teardown: leaked {:?} (before {:?})",
                b.one_vm_after, b.one_vm_before
            ));
        }
        if b.after != b.before {
            p.push(format!(
                "bound scenario: leaked {:?} (before {:?})",
                b.after, b.before
            ));
        }
        p
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

impl fmt::Display for ScaleReport {
    fn fmt(&self, out: &mut fmt::Formatter<'_>) -> fmt::Result {
        let f = &self.full;
        writeln!(
            out,
            "full space: {} VMs x {} PASIDs = {} of {} PASIDs",
            f.vms,
            f.pasids_per_vm,
            f.pasids_allocated,
            self.config.space()
        )?;
        writeln!(
            out,
            "  setup {:.1} ms (PASID_REQUEST alloc: mean {:.2} us, max {:.1} us)",
            ms(f.setup),
            us(f.alloc.mean()),
            us(f.alloc.max)
        )?;
        writeln!(
            out,
            "  memory: RSS {:.1} MiB (+{:.1} MiB during setup), driver tables {:.1} MiB",
            mib(f.rss_bytes),
            mib(f.rss_growth_bytes),
            mib(f.table_bytes)
        )?;
        let refusal = f
            .extra_vm
            .refusal
            .as_ref()
            .map_or("none".to_string(), |e| format!("errno {} ({e})", e.errno()));
        writeln!(
            out,
            "  one more VM: {} PASIDs, then {refusal}; the refusal changed {}",
            f.extra_vm.allocated,
            if f.extra_vm.refusal_changed_nothing {
                "nothing"
            } else {
                "something"
            }
        )?;
        writeln!(
            out,
            "  teardown: {:.1} ms, per VM mean {:.3} ms, max {:.3} ms; leaked: {}",
            ms(f.teardown.total),
            ms(f.teardown.mean()),
            ms(f.teardown.max),
            if f.after == f.before {
                "nothing"
            } else {
                "SOMETHING"
            }
        )?;
        let b = &self.bound;
        writeln!(
            out,
            "bound: {} VMs x {} PASIDs, {} bound (one device per VM)",
            b.vms, b.pasids_per_vm, b.bound
        )?;
        writeln!(
            out,
            "  setup {:.1} ms (BIND: mean {:.2} us, max {:.1} us)",
            ms(b.setup),
            us(b.bind.mean()),
            us(b.bind.max)
        )?;
        writeln!(
            out,
            "  memory: RSS {:.1} MiB (+{:.1} MiB during setup), driver tables {:.1} MiB",
            mib(b.rss_bytes),
            mib(b.rss_growth_bytes),
            mib(b.table_bytes)
        )?;
        writeln!(
            out,
            "  one VM ({} PASIDs, {} bound) torn down in {:.3} ms; leaked: {}",
            b.pasids_per_vm,
            self.config.bound_per_vm,
            ms(b.one_vm_teardown),
            if b.one_vm_after == b.one_vm_before {
                "nothing"
            } else {
                "SOMETHING"
            }
        )?;
        write!(
            out,
            "  teardown: {:.1} ms, per VM mean {:.3} ms, max {:.3} ms; leaked: {}",
            ms(b.teardown.total),
            ms(b.teardown.mean()),
            ms(b.teardown.max),
            if b.after == b.before {
                "nothing"
            } else {
                "SOMETHING"
            }
        )
    }
}

/// Resident set size of this process (`/proc/self/statm`), or 0 where it cannot be read.
pub fn rss_bytes() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096)
}

/// The host: memory, the IOMMU model, its driver, the PASID allocator.
struct Host {
    hw: Arc<Iommu>,
    frames: Arc<FrameAllocator>,
    unit: Arc<HostIommu>,
    /// [`SHARED_GUEST_RAM`] in this process, the VMM's side of every bound VM's RAM.
    guest_ram: GuestMemoryMmap,
    pasids: SharedPasidAllocator,
}

type Vm = Container<VtdDomain>;

impl Host {
    fn new() -> Result<Host, ScaleError> {
        let mem = HostMemory::new(HOST_MEMORY)?;
        let frames = Arc::new(FrameAllocator::new(mem.clone()));
        let hw = Iommu::new(mem, IommuConfig::default())?;
        let unit = HostIommu::new(hw.clone(), frames.clone())?;
        let hpa = frames.alloc_range(SHARED_GUEST_RAM, SHARED_GUEST_RAM)?;
        let guest_ram = frames
            .memory()
            .guest_memory(&[(Gpa(0), hpa, SHARED_GUEST_RAM)])?;
        Ok(Host {
            hw,
            frames,
            unit,
            guest_ram,
            pasids: Arc::new(Mutex::new(PasidAllocator::new())),
        })
    }

    fn usage(&self) -> Usage {
        Usage {
            pasids: self
                .pasids
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .total_allocated(),
            table_bytes: self.frames.allocated_bytes(),
            domain_ids: self.unit.domain_ids_in_use(),
            devices: self.unit.attached_devices(),
            page_request_routes: self.unit.page_request_routes(),
            iotlb_entries: self.hw.iotlb().len(),
            cached_entries: self.hw.cached_entries(),
        }
    }

    /// A VM's container: a nesting container on a fresh domain.
    fn vm(&self, quota: u32) -> Result<Vm, ScaleError> {
        let domain = VtdDomain::new(&self.unit)?;
        let mut c = Container::new(self.pasids.clone(), quota, domain)
            .map_err(host_err("open the container"))?;
        c.set_iommu(IommuModel::Type1Nesting)
            .map_err(host_err("VFIO_SET_IOMMU"))?;
        Ok(c)
    }
}

/// A requester id for VM `i`'s device (bus 1 onwards).
fn device(i: usize) -> SourceId {
    SourceId::from_rid(0x100 + i as u16)
}

/// Allocates `n` PASIDs in `[1, max]`, timing each ioctl.
fn alloc_pasids(
    vm: &mut Vm,
    n: u32,
    max: u32,
    timing: &mut Timing,
) -> Result<Vec<Pasid>, ScaleError> {
    (0..n)
        .map(|_| {
            let t = Instant::now();
            let p = vm.pasid_alloc(1, max);
            timing.add(t.elapsed());
            p.map_err(host_err("VFIO_IOMMU_PASID_REQUEST alloc"))
        })
        .collect()
}

/// Closes every VM, timing each close.
fn teardown(vms: Vec<Vm>) -> Timing {
    let mut timing = Timing::default();
    for vm in vms {
        let t = Instant::now();
        drop(vm);
        timing.add(t.elapsed());
    }
    timing
}

fn full_space(host: &Host, cfg: &ScaleConfig) -> Result<FullSpaceReport, ScaleError> {
    let before = host.usage();
    let rss_before = rss_bytes();
    let mut alloc = Timing::default();
    let start = Instant::now();
    let mut vms = Vec::with_capacity(cfg.full_vms);
    for _ in 0..cfg.full_vms {
        let mut vm = host.vm(cfg.quota)?;
        alloc_pasids(&mut vm, cfg.quota, cfg.pasid_max, &mut alloc)?;
        vms.push(vm);
    }
    let setup = start.elapsed();
    let rss = rss_bytes();
    let usage = host.usage();

    let mut extra = host.vm(cfg.quota)?;
    let mut extra_vm = ExtraVm {
        allocated: 0,
        refusal: None,
        refusal_changed_nothing: true,
    };
    while extra_vm.allocated < cfg.quota {
        let state = (extra.state(), host.usage());
        match extra.pasid_alloc(1, cfg.pasid_max) {
            Ok(_) => extra_vm.allocated += 1,
            Err(e) => {
                extra_vm.refusal_changed_nothing = state == (extra.state(), host.usage());
                extra_vm.refusal = Some(e);
                break;
            }
        }
    }
    drop(extra);
    Ok(FullSpaceReport {
        vms: cfg.full_vms,
        pasids_per_vm: cfg.quota,
        pasids_allocated: usage.pasids - before.pasids,
        setup,
        alloc,
        rss_bytes: rss,
        rss_growth_bytes: rss.saturating_sub(rss_before),
        table_bytes: usage.table_bytes - before.table_bytes,
        extra_vm,
        teardown: teardown(vms),
        before,
        after: host.usage(),
    })
}

/// A VM of the bound scenario: a device, its full quota, `bound` PASIDs bound to the
/// shared guest table.
fn bound_vm(
    host: &Host,
    cfg: &ScaleConfig,
    index: usize,
    bind: &mut Timing,
) -> Result<Vm, ScaleError> {
    let mut vm = host.vm(cfg.quota)?;
    // The device on the bus before the attach reads its capabilities: binding needs its
    // 20-bit PASIDs (F15).
    let engine = DmaEngine::new(
        DmaEngineConfig::new(device(index)),
        host.hw.clone() as Arc<dyn DmaPort>,
    )?;
    host.hw.attach_endpoint(Arc::new(engine));
    vm.attach_device(device(index))
        .map_err(host_err("attaching the VM's device"))?;
    let vaddr = host
        .guest_ram
        .get_host_address(GuestAddress(0))
        .map_err(|e| HostMemoryError::GuestWindow(e.to_string()))? as u64;
    vm.map_dma(&DmaMap {
        iova: Iova(0),
        vaddr,
        size: SHARED_GUEST_RAM,
        read: true,
        write: true,
    })
    .map_err(host_err("VFIO_IOMMU_MAP_DMA"))?;
    let mut unused = Timing::default();
    let pasids = alloc_pasids(&mut vm, cfg.quota, Pasid::MAX.raw(), &mut unused)?;
    for &hpasid in pasids.iter().take(cfg.bound_per_vm) {
        let data = BindGpasid {
            hpasid,
            gpasid: Some(hpasid),
            gpgd: SHARED_GUEST_TABLE,
            addr_width: ADDR_WIDTH_4LEVEL,
            vtd_flags: 0,
            pat: 0,
            emt: 0,
        };
        let t = Instant::now();
        let r = vm.bind_gpasid(&data);
        bind.add(t.elapsed());
        r.map_err(host_err("VFIO_IOMMU_BIND"))?;
    }
    Ok(vm)
}

fn bound(host: &Host, cfg: &ScaleConfig) -> Result<BoundReport, ScaleError> {
    let before = host.usage();
    let rss_before = rss_bytes();
    let mut bind = Timing::default();
    let start = Instant::now();
    let mut vms = Vec::with_capacity(cfg.bound_vms);
    for i in 0..cfg.bound_vms {
        vms.push(bound_vm(host, cfg, i, &mut bind)?);
    }
    let setup = start.elapsed();
    let rss = rss_bytes();
    let usage = host.usage();

    let one_vm_before = host.usage();
    let one = bound_vm(host, cfg, cfg.bound_vms, &mut Timing::default())?;
    let t = Instant::now();
    drop(one);
    let one_vm_teardown = t.elapsed();
    let one_vm_after = host.usage();

    Ok(BoundReport {
        vms: cfg.bound_vms,
        pasids_per_vm: cfg.quota,
        bound: bind.count,
        setup,
        bind,
        rss_bytes: rss,
        rss_growth_bytes: rss.saturating_sub(rss_before),
        table_bytes: usage.table_bytes - before.table_bytes,
        one_vm_teardown,
        one_vm_before,
        one_vm_after,
        teardown: teardown(vms),
        before,
        after: host.usage(),
    })
}

/// Runs both scenarios of `cfg` on one host (the real container, driver and IOMMU model)
/// and reports what it measured. Fails only when the host cannot be set up or a step that
/// must succeed is refused.
pub fn run_scale(cfg: &ScaleConfig) -> Result<ScaleReport, ScaleError> {
    let host = Host::new()?;
    let full = full_space(&host, cfg)?;
    let bound = bound(&host, cfg)?;
    Ok(ScaleReport {
        config: *cfg,
        full,
        bound,
    })
}
