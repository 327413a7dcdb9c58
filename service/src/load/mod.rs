//! `vsva load`: a `vsva host` process and N VM processes (`vsva load-worker`, the VM of
//! `vsva vm` in a loop: `vsva_testbed::remote::load_worker`, or on an SMMUv3 host
//! (`--iommu smmuv3`) the arm64 VM of `vsva vm --iommu smmuv3`:
//! `vsva_testbed::smmu_demo::load_worker`) that loop bind → DMA → verify → invalidate →
//! unbind with random sizes; in chaos mode random VM processes are
//! killed (SIGKILL) at random points and new ones started. At the end every live VM
//! checks the bytes its device wrote at its start, the host's `STATE` must equal its
//! baseline plus what the live VMs hold, and after they leave, the baseline again.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::protocol::HostState;
use crate::server::IommuArch;
use crate::{client::RemoteFile, process::HostProcess};

/// Samples kept per VM process and series (the first ones; enough for seconds of load).
const MAX_SAMPLES: usize = 200_000;
/// Bounded waits: for reports, for exits, for the host to settle.
const WAIT: Duration = Duration::from_secs(60);

/// Latency samples in nanoseconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Samples(Vec<u64>);

impl Samples {
    /// Adds one (past `MAX_SAMPLES` they are dropped).
    pub fn push(&mut self, d: Duration) {
        if self.0.len() < MAX_SAMPLES {
            self.0.push(d.as_nanos().min(u128::from(u64::MAX)) as u64);
        }
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The `p`th percentile of `v` (sorted in place); 0 for none.
fn percentile(v: &mut [u64], p: usize) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[(v.len() * p / 100).min(v.len() - 1)]
}

/// What one VM process holds on the host (the fields of [`HostState`] it adds to).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// Connections.
    pub connections: u64,
    /// PASIDs allocated.
    pub pasids: u64,
    /// PASIDs bound.
    pub binds: u64,
    /// Memory windows.
    pub windows: u64,
    /// Bytes of them.
    pub window_bytes: u64,
    /// DMA mappings.
    pub dma_mappings: u64,
    /// Devices attached.
    pub devices: u64,
    /// Domain ids.
    pub domain_ids: u64,
    /// Page request groups waiting.
    pub page_requests: u64,
    /// Fault records unread.
    pub faults_unread: u64,
}

impl Held {
    /// What a `vsva load` VM holds between its cycles: its connection, one window of
    /// `ram` bytes (its RAM) mapped once, its device and its domain's id, and `pasids`
    /// PASIDs, each allocated and bound (a VT-d VM's keeper; an SMMUv3 VM's guest owns its
    /// SubstreamIDs and asks the host for none).
    pub fn load_vm(ram: u64, pasids: u64) -> Held {
        Held {
            connections: 1,
            pasids,
            binds: pasids,
            windows: 1,
            window_bytes: ram,
            dma_mappings: 1,
            devices: 1,
            domain_ids: 1,
            page_requests: 0,
            faults_unread: 0,
        }
    }

    /// The same fields of `s` less `base`.
    fn of(s: &HostState, base: &HostState) -> Held {
        let d = |a: u64, b: u64| a.wrapping_sub(b);
        Held {
            connections: d(s.connections, base.connections),
            pasids: d(s.pasids, base.pasids),
            binds: d(s.binds, base.binds),
            windows: d(s.windows, base.windows),
            window_bytes: d(s.window_bytes, base.window_bytes),
            dma_mappings: d(s.dma_mappings, base.dma_mappings),
            devices: d(s.devices, base.devices),
            domain_ids: d(s.domain_ids, base.domain_ids),
            page_requests: d(s.page_requests, base.page_requests),
            faults_unread: d(s.faults_unread, base.faults_unread),
        }
    }
}

impl std::ops::Add for Held {
    type Output = Held;

    fn add(self, h: Held) -> Held {
        Held {
            connections: self.connections + h.connections,
            pasids: self.pasids + h.pasids,
            binds: self.binds + h.binds,
            windows: self.windows + h.windows,
            window_bytes: self.window_bytes + h.window_bytes,
            dma_mappings: self.dma_mappings + h.dma_mappings,
            devices: self.devices + h.devices,
            domain_ids: self.domain_ids + h.domain_ids,
            page_requests: self.page_requests + h.page_requests,
            faults_unread: self.faults_unread + h.faults_unread,
        }
    }
}

/// What one VM process reports when its time is up.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WorkerReport {
    /// Cycles completed.
    pub cycles: u64,
    /// Bytes the device copied and the CPU found right.
    pub bytes_verified: u64,
    /// Bytes of the buffer the device filled at the start, found intact at the end.
    pub keeper_bytes: u64,
    /// Failed cycles and checks.
    pub errors: u64,
    /// What failed (the first ones).
    pub messages: Vec<String>,
    /// Forwarded invalidations: `VFIO_IOMMU_CACHE_INVALIDATE` over the socket.
    pub fwd_inv_ns: Samples,
    /// Page request round trips: read the request, the guest handles it, write the
    /// response.
    pub prq_ns: Samples,
    /// What it holds on the host.
    pub held: Held,
}

/// What `vsva load` runs.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// VM processes at once.
    pub vms: usize,
    /// How long they loop.
    pub duration: Duration,
    /// Chaos: kill a random VM process about this often (and start a new one).
    pub kill_every: Option<Duration>,
    /// Seed of the sizes, the data and the kills.
    pub seed: u64,
    /// Largest buffer, in pages.
    pub max_pages: u64,
    /// The host's IOMMU (and so the VMs': a virtual VT-d, or a virtual SMMUv3).
    pub iommu: IommuArch,
}

/// The `--iommu` argument of `vsva host` and `vsva load-worker` naming `iommu`.
fn iommu_arg(iommu: IommuArch) -> &'static str {
    match iommu {
        IommuArch::Vtd => "vtd",
        IommuArch::Smmuv3 => "smmuv3",
    }
}

/// What `vsva load` measured and checked.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LoadReport {
    /// The host's IOMMU: `vtd` or `smmuv3`.
    pub iommu: &'static str,
    /// VM processes at once.
    pub vms: usize,
    /// Seconds of load.
    pub seconds: f64,
    /// Cycles (bind → DMA → verify → invalidate → unbind) the reporting VMs completed.
    pub ops: u64,
    /// `ops` per second.
    pub ops_per_sec: f64,
    /// Forwarded invalidation across processes, median.
    pub fwd_inv_p50_ns: u64,
    /// Forwarded invalidation, 99th percentile.
    pub fwd_inv_p99_ns: u64,
    /// Forwarded invalidations timed.
    pub fwd_inv_samples: usize,
    /// Page request round trip across processes, median.
    pub prq_p50_ns: u64,
    /// Page request round trip, 99th percentile.
    pub prq_p99_ns: u64,
    /// Page request round trips timed.
    pub prq_samples: usize,
    /// Bytes verified by the VMs that lived to report (copies, and the keeper buffers
    /// checked at the end).
    pub bytes_verified: u64,
    /// VM processes killed (each one's state checked gone at the end).
    pub kills: u64,
    /// VM processes started.
    pub started: u64,
    /// Failed cycles, failed checks, and failures of the run itself.
    pub errors: u64,
    /// What failed (the first ones).
    pub messages: Vec<String>,
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "vsva load ({}): {} VMs for {:.1} s: {} ops ({:.0} ops/s); forwarded invalidation p50 {:.1} µs p99 {:.1} µs ({} timed); page request round trip p50 {:.1} µs p99 {:.1} µs ({} timed); {} bytes verified; {} kills survived ({} VM processes started); {} errors",
            self.iommu,
            self.vms,
            self.seconds,
            self.ops,
            self.ops_per_sec,
            self.fwd_inv_p50_ns as f64 / 1e3,
            self.fwd_inv_p99_ns as f64 / 1e3,
            self.fwd_inv_samples,
            self.prq_p50_ns as f64 / 1e3,
            self.prq_p99_ns as f64 / 1e3,
            self.prq_samples,
            self.bytes_verified,
            self.kills,
            self.started,
            self.errors
        )
    }
}

/// A failure to run the load at all (a failed check is an error in the report instead).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A process could not be started or reached.
    #[error("{0}")]
    Setup(String),
}

/// A VM process and what it said.
struct Vm {
    child: Child,
    stdin: Option<ChildStdin>,
    report: Option<WorkerReport>,
    killed: bool,
}

/// A line of a VM process's stdout, with the VM's number.
type Line = (usize, String);

/// Starts VM process `n` of `exe` on `socket`, to loop until `until`.
fn spawn_vm(
    exe: &Path,
    socket: &Path,
    n: usize,
    seed: u64,
    until: Instant,
    opts: &LoadOptions,
    lines: &mpsc::Sender<Line>,
) -> Result<Vm, LoadError> {
    let millis = until.saturating_duration_since(Instant::now()).as_millis();
    let mut child = Command::new(exe)
        .args(["load-worker", "--socket"])
        .arg(socket)
        .args([
            "--seed",
            &seed.to_string(),
            "--millis",
            &millis.to_string(),
            "--max-pages",
            &opts.max_pages.to_string(),
            "--iommu",
            iommu_arg(opts.iommu),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| LoadError::Setup(format!("starting VM process {n}: {e}")))?;
    let out = BufReader::new(child.stdout.take().expect("piped"));
    let tx = lines.clone();
    std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            if tx.send((n, line)).is_err() {
                return;
            }
        }
    });
    let stdin = child.stdin.take();
    Ok(Vm {
        child,
        stdin,
        report: None,
        killed: false,
    })
}

/// Waits (bounded) for `child` to exit; whether it succeeded.
fn wait_exit(child: &mut Child, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// Kills the processes left when dropped (a run that failed half-way).
struct Reaper(Vec<Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Counts a failure of the run and keeps its message (the first 20).
fn fail(report: &mut LoadReport, what: String) {
    report.errors += 1;
    if report.messages.len() < 20 {
        report.messages.push(what);
    }
}

/// Runs the load: `exe` is the `vsva` binary (its `host` and `load-worker` commands).
pub fn run(exe: &Path, opts: &LoadOptions) -> Result<LoadReport, LoadError> {
    let mut report = LoadReport {
        iommu: iommu_arg(opts.iommu),
        vms: opts.vms,
        seconds: opts.duration.as_secs_f64(),
        ..LoadReport::default()
    };
    let host = HostProcess::start(
        exe,
        "load",
        &["--memory", "4G", "--iommu", iommu_arg(opts.iommu)],
    )
    .map_err(|e| LoadError::Setup(e.to_string()))?;
    let socket = host.socket();
    let (probe, baseline) = host.probe().map_err(|e| LoadError::Setup(e.to_string()))?;
    let state = |probe: &RemoteFile| {
        probe
            .host_state()
            .map_err(|e| LoadError::Setup(format!("host STATE: {e}")))
    };

    let (tx, rx) = mpsc::channel::<Line>();
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let start = Instant::now();
    let until = start + opts.duration;
    let mut vms: Vec<Vm> = Vec::new();
    let mut reaper = Reaper(Vec::new());
    for _ in 0..opts.vms {
        let n = vms.len();
        vms.push(spawn_vm(exe, socket, n, rng.next_u64(), until, opts, &tx)?);
    }
    let chaos = |rng: &mut StdRng, every: Duration| {
        let ms = every.as_millis().max(2) as u64;
        Duration::from_millis(ms / 2 + rng.next_u64() % ms)
    };
    let mut next_kill = opts.kill_every.map(|k| Instant::now() + chaos(&mut rng, k));
    let take_line = |vms: &mut Vec<Vm>, report: &mut LoadReport, (n, line): Line| {
        if let Some(json) = line.strip_prefix("report ") {
            match serde_json::from_str::<WorkerReport>(json) {
                Ok(r) => vms[n].report = Some(r),
                Err(e) => fail(report, format!("VM process {n}: an unreadable report: {e}")),
            }
        }
    };
    while Instant::now() < until {
        while let Ok(l) = rx.try_recv() {
            take_line(&mut vms, &mut report, l);
        }
        if let (Some(at), Some(every)) = (next_kill, opts.kill_every) {
            if Instant::now() >= at {
                let live: Vec<usize> = (0..vms.len()).filter(|&i| !vms[i].killed).collect();
                if !live.is_empty() {
                    let victim = live[(rng.next_u64() % live.len() as u64) as usize];
                    let vm = &mut vms[victim];
                    let _ = vm.child.kill();
                    let _ = vm.child.wait();
                    vm.killed = true;
                    report.kills += 1;
                    let n = vms.len();
                    if until.saturating_duration_since(Instant::now()) > Duration::from_millis(50) {
                        vms.push(spawn_vm(exe, socket, n, rng.next_u64(), until, opts, &tx)?);
                    }
                }
                next_kill = Some(Instant::now() + chaos(&mut rng, every));
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    report.started = vms.len() as u64;
    drop(tx);

    // Every live VM reports (or exits without one: an error).
    let deadline = Instant::now() + WAIT;
    loop {
        let waiting: Vec<usize> = (0..vms.len())
            .filter(|&i| !vms[i].killed && vms[i].report.is_none())
            .collect();
        if waiting.is_empty() {
            break;
        }
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(l) => take_line(&mut vms, &mut report, l),
            Err(_) => {
                for i in waiting {
                    if let Ok(Some(status)) = vms[i].child.try_wait() {
                        vms[i].killed = true;
                        fail(
                            &mut report,
                            format!("VM process {i} exited ({status}) without a report"),
                        );
                    }
                }
                if Instant::now() > deadline {
                    fail(&mut report, "VM processes never reported".into());
                    break;
                }
            }
        }
    }
    // The host holds its baseline plus exactly what the live VMs hold.
    let live: Vec<&WorkerReport> = vms
        .iter()
        .filter(|v| !v.killed)
        .filter_map(|v| v.report.as_ref())
        .collect();
    // A VM killed just before the end may still be closing on the host: wait (bounded)
    // for its connection to go.
    let want = live.iter().fold(Held::default(), |sum, r| sum + r.held);
    let deadline = Instant::now() + WAIT;
    let mut got = Held::of(&state(&probe)?, &baseline);
    while got != want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
        got = Held::of(&state(&probe)?, &baseline);
    }
    if got != want {
        fail(
            &mut report,
            format!("the host holds {got:?} beyond its baseline; the live VMs hold {want:?}"),
        );
    }
    let mut fwd = Vec::new();
    let mut prq = Vec::new();
    for r in &live {
        report.ops += r.cycles;
        report.bytes_verified += r.bytes_verified + r.keeper_bytes;
        report.errors += r.errors;
        for m in r.messages.iter().take(5) {
            if report.messages.len() < 20 {
                report.messages.push(m.clone());
            }
        }
        fwd.extend_from_slice(&r.fwd_inv_ns.0);
        prq.extend_from_slice(&r.prq_ns.0);
    }
    report.ops_per_sec = report.ops as f64 / opts.duration.as_secs_f64().max(1e-9);
    report.fwd_inv_samples = fwd.len();
    report.fwd_inv_p50_ns = percentile(&mut fwd, 50);
    report.fwd_inv_p99_ns = percentile(&mut fwd, 99);
    report.prq_samples = prq.len();
    report.prq_p50_ns = percentile(&mut prq, 50);
    report.prq_p99_ns = percentile(&mut prq, 99);

    // The VMs leave; the host is back at its baseline.
    for (i, vm) in vms.iter_mut().enumerate() {
        drop(vm.stdin.take());
        if !vm.killed && !wait_exit(&mut vm.child, WAIT) {
            fail(
                &mut report,
                format!("VM process {i} did not shut down cleanly"),
            );
        }
    }
    reaper.0.extend(vms.into_iter().map(|v| v.child));
    let deadline = Instant::now() + WAIT;
    let mut last = state(&probe)?;
    while last != baseline && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
        last = state(&probe)?;
    }
    if last != baseline {
        fail(
            &mut report,
            format!("after the VMs left the host holds {last:?}, not its baseline {baseline:?}"),
        );
    }
    drop(probe);
    match host.stop() {
        Ok(exit) if exit.success() && exit.nothing_left_behind() => {}
        Ok(exit) => fail(&mut report, format!("at teardown: {exit}")),
        Err(e) => fail(&mut report, format!("at teardown: {e}")),
    }
    Ok(report)
}
