//! DMA workloads: the DMA engine's memmove through nested translation against the CPU's
//! copy of the same bytes, and the table reads of streaming DMA.

use std::cell::RefCell;
use std::hint::black_box;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vsva_mem::PhysMem;

use vsva_hw::dma::regs::CTRL_PASID_EN;
use vsva_hw::dma::{CompletionRequest, Descriptor, DmaEngine, DmaEngineConfig, Operation};
use vsva_hw::{memory::HostMemory, memory::PAGE_SIZE};
use vsva_vtd::addr::Hpa;
use vsva_vtd::{walk::walk_nested, walk::AccessRequest, walk::WalkObserver, walk::WalkStep};

use super::lockstep::{SampleHalf, SecondThread};
use super::platform::Platform;
use super::{BenchError, Workload};

/// Bytes one memmove descriptor copies.
pub const MEMMOVE_BYTES: u64 = 1 << 20;
/// Descriptors submitted before the engine runs, while streaming (below the work queue's
/// 128 entries).
const STREAM_BATCH: u64 = 64;

/// A DMA engine of device 0 with PASIDs enabled (no ATS: every page run is an untranslated
/// request translated by the IOMMU).
fn engine(p: &Platform) -> Result<DmaEngine, BenchError> {
    engine_of(p, 0)
}

/// A DMA engine of device `device`, as [`engine`].
fn engine_of(p: &Platform, device: u8) -> Result<DmaEngine, BenchError> {
    let port: Arc<dyn vsva_hw::dma::DmaPort> = p.iommu().clone();
    let engine = DmaEngine::new(DmaEngineConfig::new(p.device(device)), port)?;
    engine.enable(CTRL_PASID_EN)?;
    Ok(engine)
}

/// A memmove descriptor in the nested PASID's address space, without completion record.
fn memmove(p: &Platform, src: u64, dst: u64, size: u64) -> [u8; 64] {
    Descriptor {
        pasid: Some(p.nested_pasid()),
        privileged: false,
        block_on_fault: false,
        completion: CompletionRequest::None,
        op: Operation::Memmove {
            src,
            dst,
            size: size as u32,
        },
    }
    .encode()
}

/// Submits `desc` and runs the engine; `false` unless exactly one descriptor completed.
fn submit(engine: &DmaEngine, desc: &[u8; 64]) -> Result<bool, BenchError> {
    engine.portal_write(0, desc)?;
    Ok(engine.process() == 1)
}

/// The operands of a 1 MiB copy in the guest buffer's `device`-th 2 MiB: the source (its
/// first MiB) holds a pattern; the destination (its second) is cleared before each timed
/// run and compared with the pattern after it, so that every run's figure is of copies
/// that were made.
struct CopyCheck {
    memory: Arc<HostMemory>,
    /// Host physical address of the source.
    src: u64,
    /// Host physical address of the destination.
    dst: u64,
    pattern: Vec<u8>,
    copy: Vec<u8>,
}

impl CopyCheck {
    /// Writes the source pattern; the guest buffer's `device`-th 2 MiB must exist.
    fn new(p: &Platform, device: u8) -> Result<Self, BenchError> {
        let base = u64::from(device) * 2 * MEMMOVE_BYTES;
        if device >= p.devices() || p.buffer_len() < base + 2 * MEMMOVE_BYTES {
            return Err(BenchError::Check(format!(
                "the platform has no device {device} or no 2 MiB of guest buffer at {base:#x}"
            )));
        }
        let pattern: Vec<u8> = (0..MEMMOVE_BYTES)
            .map(|i| (i * 7 + i / 4096 + u64::from(device)) as u8)
            .collect();
        p.memory().write(p.hpa(base), &pattern)?;
        Ok(CopyCheck {
            memory: p.memory().clone(),
            src: p.hpa(base),
            dst: p.hpa(base + MEMMOVE_BYTES),
            pattern,
            copy: vec![0; MEMMOVE_BYTES as usize],
        })
    }

    fn clear_destination(&mut self) -> Result<(), BenchError> {
        self.copy.fill(0);
        self.memory.write(self.dst, &self.copy)?;
        Ok(())
    }

    /// The destination must hold the source pattern.
    fn check_copy(&mut self) -> Result<(), BenchError> {
        self.memory.read(self.dst, &mut self.copy)?;
        match self
            .copy
            .iter()
            .zip(&self.pattern)
            .position(|(a, b)| a != b)
        {
            None => Ok(()),
            Some(at) => Err(BenchError::Check(format!(
                "the copy left byte {at} of the destination at {:#04x}, not {:#04x}",
                self.copy[at], self.pattern[at]
            ))),
        }
    }
}

/// The DMA engine copying 1 MiB from the guest buffer's first MiB to its second, in GVAs
/// through nested translation with 4 KiB pages, IOTLB warm. An operation is one
/// descriptor.
///
/// Before each timed run the destination is cleared (untimed), and after it the copy is
/// compared with the source pattern, so every run's figure is of copies that were made.
pub struct NestedMemmove {
    engine: DmaEngine,
    desc: [u8; 64],
    target: CopyCheck,
}

impl NestedMemmove {
    /// Fills the source with a pattern, copies it once and checks the copy (which also
    /// warms the IOTLB). The guest buffer must hold at least 2 MiB.
    pub fn new(p: &Platform) -> Result<Self, BenchError> {
        NestedMemmove::on_device(p, 0)
    }

    /// The same on device `device`'s engine (its own requester id, domain and IOTLB
    /// entries), copying within the guest buffer's `device`-th 2 MiB, which must exist.
    pub fn on_device(p: &Platform, device: u8) -> Result<Self, BenchError> {
        let target = CopyCheck::new(p, device)?;
        let base = u64::from(device) * 2 * MEMMOVE_BYTES;
        let mut w = NestedMemmove {
            desc: memmove(p, p.gva(base), p.gva(base + MEMMOVE_BYTES), MEMMOVE_BYTES),
            engine: engine_of(p, device)?,
            target,
        };
        w.target.clear_destination()?;
        let done = submit(&w.engine, &w.desc)?;
        if !done || w.engine.stats().failed != 0 {
            return Err(BenchError::Check(
                "the DMA engine's first memmove did not complete".into(),
            ));
        }
        w.target.check_copy()?;
        Ok(w)
    }

    /// `iters` copies, untimed and unchecked: the part [`Workload::run`] times.
    fn copies(&mut self, iters: u64) -> Result<(), BenchError> {
        let mut ok = true;
        for _ in 0..iters {
            ok &= submit(&self.engine, &self.desc)?;
        }
        if !ok || self.engine.stats().failed != 0 {
            return Err(BenchError::Check("a memmove descriptor failed".into()));
        }
        Ok(())
    }
}

impl Workload for NestedMemmove {
    fn run(&mut self, iters: u64) -> Result<Duration, BenchError> {
        self.target.clear_destination()?;
        let start = Instant::now();
        self.copies(iters)?;
        let t = start.elapsed();
        self.target.check_copy()?;
        Ok(t)
    }
}

/// Device 0's and device 1's engines (two requester ids and domains, as two VMs' devices,
/// with their own IOTLB entries), each copying 1 MiB per operation through nested
/// translation in its own part of the guest buffer, on one shared IOMMU: device 0's on
/// the timing thread and device 1's on a second thread (`SecondThread`, the two pinned to
/// two CPUs). [`TwoEngineMemmove`] runs them at once, [`EnginesInTurn`] one at a time;
/// both destinations are cleared before and checked after every sample.
pub struct TwoEngines {
    mine: NestedMemmove,
    other: SecondThread,
}

impl SampleHalf for NestedMemmove {
    fn prepare(&mut self) -> Result<(), BenchError> {
        self.target.clear_destination()
    }

    fn work(&mut self, iters: u64) -> Result<(), BenchError> {
        self.copies(iters)
    }

    fn check(&mut self) -> Result<(), BenchError> {
        self.target.check_copy()
    }
}

impl TwoEngines {
    /// Engines of devices 0 and 1 of `p` (a guest buffer of 4 MiB at least), each checked
    /// once; starts the second thread. Shared by the two workloads, which sample in turn.
    pub fn new(p: &Platform) -> Result<Rc<RefCell<Self>>, BenchError> {
        let mine = NestedMemmove::on_device(p, 0)?;
        let theirs = NestedMemmove::on_device(p, 1)?;
        Ok(Rc::new(RefCell::new(TwoEngines {
            mine,
            other: SecondThread::spawn("dma-engine-1", theirs)?,
        })))
    }
}

/// `iters` operations (one copy on each engine) at the rate of both threads' copies
/// summed, from each thread's time for its `iters` copies: `2 / (1/a + 1/b)`.
fn at_summed_rate(a: Duration, b: Duration) -> Duration {
    let rate = |t: Duration| 1.0 / t.as_secs_f64().max(1e-9);
    Duration::from_secs_f64(2.0 / (rate(a) + rate(b)))
}

/// DMA throughput on two threads: both engines of [`TwoEngines`] copying at once. An
/// operation is one copy on each engine; its time is that of the two threads' throughput
/// summed, each thread's from its own time for its copies (the second thread times its
/// half itself). The two-thread speedup is [`EnginesInTurn`]'s time over this one's: the
/// same engines on the same threads and CPUs, one at a time.
///
/// Not the wall time of the pair: the two threads' copies do not always run at one speed
/// (in four idle runs, one process each, the second thread's took 1.17, 0.95, 0.98 and
/// 0.93 times the first's, alone and at once alike, within half a percent), and a wall
/// time waits for the slower thread, so a speedup of wall times (1.86 to 1.98 in those
/// runs, where this one read 2.00 to 2.01) read how far apart the two were, not whether
/// the engines slowed each other down. Each thread's copies are timed while the other
/// copies too, but for the slower one's last few (a seventh of its time at 1.17).
pub struct TwoEngineMemmove(Rc<RefCell<TwoEngines>>);

impl TwoEngineMemmove {
    /// Both engines of `engines` at once.
    pub fn new(engines: &Rc<RefCell<TwoEngines>>) -> Self {
        TwoEngineMemmove(Rc::clone(engines))
    }
}

impl Workload for TwoEngineMemmove {
    fn run(&mut self, iters: u64) -> Result<Duration, BenchError> {
        let mut engines = self.0.borrow_mut();
        let TwoEngines { mine, other } = &mut *engines;
        mine.target.clear_destination()?;
        let s = other.sample(iters, || {
            let start = Instant::now();
            mine.copies(iters).map(|()| start.elapsed())
        })?;
        let mine_took = s.mine?;
        mine.target.check_copy()?;
        Ok(at_summed_rate(mine_took, s.theirs))
    }
}

/// The baseline of [`TwoEngineMemmove`]: the same two engines on the same two threads,
/// one at a time (the timing thread's copies, then the second thread's while the timing
/// thread sleeps), each destination cleared before and checked after its copies. An
/// operation is one copy on each engine, at one thread's throughput (the mean of the
/// two threads' alone): `4 / (1/a + 1/b)`, which is `a + b` when the two threads run at
/// one speed.
pub struct EnginesInTurn(Rc<RefCell<TwoEngines>>);

impl EnginesInTurn {
    /// The engines of `engines`, one at a time.
    pub fn new(engines: &Rc<RefCell<TwoEngines>>) -> Self {
        EnginesInTurn(Rc::clone(engines))
    }
}

impl Workload for EnginesInTurn {
    fn run(&mut self, iters: u64) -> Result<Duration, BenchError> {
        let mut engines = self.0.borrow_mut();
        let mine = engines.mine.run(iters)?;
        let theirs = engines.other.alone(iters)?;
        Ok(2 * at_summed_rate(mine, theirs))
    }
}

/// The baseline of [`NestedMemmove`]: the CPU copying the same 1 MiB of host memory to the
/// same destination (`HostMemory::copy`: glibc's `memmove`, whose code is its `memcpy`'s
/// for ranges apart), the destination cleared before each timed run and compared after
/// it, as the engine's is. Both sides move the same bytes through the same caches, so
/// their ratio is the engine's cost over the copy's: with a baseline of two heap buffers
/// of its own, the ratio read where each side's 2 MiB fell in the core's 2 MiB L2
/// (0.86-1.10 from one process to the next).
pub struct HostCopy {
    target: CopyCheck,
}

impl HostCopy {
    /// The operands of [`NestedMemmove::new`] on `p`, copied once and checked.
    pub fn new(p: &Platform) -> Result<Self, BenchError> {
        let mut w = HostCopy {
            target: CopyCheck::new(p, 0)?,
        };
        w.run(1)?;
        Ok(w)
    }
}

impl Workload for HostCopy {
    fn run(&mut self, iters: u64) -> Result<Duration, BenchError> {
        self.target.clear_destination()?;
        let t = &self.target;
        let start = Instant::now();
        for _ in 0..iters {
            t.memory
                .copy(Hpa(black_box(t.src)), Hpa(black_box(t.dst)), MEMMOVE_BYTES)?;
        }
        let elapsed = start.elapsed();
        self.target.check_copy()?;
        Ok(elapsed)
    }
}

/// What streaming DMA cost in table reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamCount {
    /// IOTLB misses (walks).
    pub misses: u64,
    /// Table entries those walks read, as the IOMMU counts them.
    pub table_reads: u64,
}

impl StreamCount {
    /// Mean table reads per miss; `None` when the IOMMU counted no read (a model that does
    /// not count them).
    pub fn reads_per_miss(&self) -> Option<f64> {
        (self.misses > 0 && self.table_reads > 0)
            .then(|| self.table_reads as f64 / self.misses as f64)
    }
}

/// Streams 4 KiB memmove descriptors over the guest buffer's pages (from the second on)
/// into its first page: every source page misses the IOTLB, while the context and PASID
/// caches stay warm after the first request. Counts the walks and table reads of the
/// stream in the IOMMU's statistics.
pub fn stream_reads(p: &Platform) -> Result<StreamCount, BenchError> {
    let pages = p.buffer_len() / PAGE_SIZE;
    if pages < 2 {
        return Err(BenchError::Check("the guest buffer holds one page".into()));
    }
    p.invalidate_all()?;
    let engine = engine(p)?;
    // Warm the context and PASID caches and the destination page.
    p.iommu().translate(
        p.device(0),
        Some(p.nested_pasid()),
        p.gva(0),
        AccessRequest::WRITE,
    )?;
    let stats = p.iommu().stats();
    let (walks, reads) = (
        stats.walks.load(Ordering::Relaxed),
        stats.table_reads.load(Ordering::Relaxed),
    );
    let mut page = 1;
    while page < pages {
        let end = (page + STREAM_BATCH).min(pages);
        for src in page..end {
            engine.portal_write(0, &memmove(p, p.gva(src * PAGE_SIZE), p.gva(0), PAGE_SIZE))?;
        }
        let done = engine.process() as u64;
        if done != end - page {
            return Err(BenchError::Check(format!(
                "{done} of {} streaming descriptors completed",
                end - page
            )));
        }
        page = end;
    }
    let count = StreamCount {
        misses: stats.walks.load(Ordering::Relaxed) - walks,
        table_reads: stats.table_reads.load(Ordering::Relaxed) - reads,
    };
    if engine.stats().failed != 0 || count.misses != pages - 1 {
        return Err(BenchError::Check(format!(
            "streaming {} pages walked {} times ({} descriptors failed)",
            pages - 1,
            count.misses,
            engine.stats().failed
        )));
    }
    Ok(count)
}

/// Counts the entries a walk reads.
#[derive(Default)]
struct CountSteps(u64);

impl WalkObserver for CountSteps {
    fn step(&mut self, _: WalkStep) {
        self.0 += 1;
    }
}

/// The entries one nested walk of a 4 KiB page reads with no cache at all, once its
/// accessed bits are set (the first walk of a page also writes them, through the second
/// level): the vtd walker alone, for comparison with the IOMMU's reads per miss.
pub fn nested_walk_reads(p: &Platform) -> Result<u64, BenchError> {
    let (fl, sl) = (p.fl_config()?, p.sl_config()?);
    let mut steps = CountSteps::default();
    for _ in 0..2 {
        steps.0 = 0;
        walk_nested(
            &**p.memory(),
            &fl,
            &sl,
            p.gva(PAGE_SIZE),
            AccessRequest::READ,
            &mut steps,
        )
        .map_err(|f| BenchError::Check(format!("nested walk faulted: {f:?}")))?;
    }
    Ok(steps.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::platform::PlatformConfig;

    fn platform(buffer: u64) -> Platform {
        Platform::new(PlatformConfig { devices: 1, buffer }).unwrap()
    }

    #[test]
    fn two_engines_copy_in_lockstep_and_check_both_copies() {
        let p = Platform::new(PlatformConfig {
            devices: 2,
            buffer: 4 * MEMMOVE_BYTES,
        })
        .unwrap();
        let engines = TwoEngines::new(&p).unwrap();
        let mut two = TwoEngineMemmove::new(&engines);
        let mut one = EnginesInTurn::new(&engines);
        for _ in 0..3 {
            two.run(2).unwrap();
            one.run(2).unwrap();
        }
        assert_eq!(engines.borrow().other.samples_done(), 6);
        // A corrupted source of the second engine fails the samples that copy it, on two
        // threads and on one.
        p.memory()
            .write(p.hpa(2 * MEMMOVE_BYTES + 100), &[0xee])
            .unwrap();
        assert!(matches!(two.run(1), Err(BenchError::Check(_))));
        let e = one.run(1).unwrap_err().to_string();
        assert!(e.contains("byte 100"), "{e}");
        // Device 2 does not exist on this platform.
        assert!(NestedMemmove::on_device(&p, 2).is_err());
    }

    #[test]
    fn the_summed_rate_of_two_threads_is_their_harmonic_mean() {
        let us = Duration::from_micros;
        assert_eq!(at_summed_rate(us(30), us(30)), us(30));
        // 1/20 + 1/60 = 1/15: two operations in 30 µs.
        assert_eq!(at_summed_rate(us(20), us(60)), us(30));
        assert!(at_summed_rate(Duration::ZERO, us(60)) < us(1));
    }

    #[test]
    fn memmove_copies_and_keeps_copying() {
        let p = platform(2 * MEMMOVE_BYTES);
        let mut m = NestedMemmove::new(&p).unwrap();
        let walks = p.iommu().stats().walks.load(Ordering::Relaxed);
        m.run(2).unwrap();
        assert_eq!(
            p.iommu().stats().walks.load(Ordering::Relaxed),
            walks,
            "the IOTLB is warm"
        );
        HostCopy::new(&p).unwrap().run(2).unwrap();
    }

    #[test]
    fn a_timed_run_whose_copy_differs_fails() {
        let p = platform(2 * MEMMOVE_BYTES);
        let mut m = NestedMemmove::new(&p).unwrap();
        m.run(3).unwrap();
        // The copies of the next run carry this byte to the destination.
        p.memory().write(p.hpa(4097), &[0xee]).unwrap();
        let e = m.run(3).unwrap_err().to_string();
        assert!(e.contains("byte 4097"), "{e}");
    }

    #[test]
    fn the_baseline_copies_the_engines_operands_and_checks_them() {
        let p = platform(2 * MEMMOVE_BYTES);
        let mut m = NestedMemmove::new(&p).unwrap();
        let mut host = HostCopy::new(&p).unwrap();
        host.run(3).unwrap();
        m.run(1).unwrap();
        // A byte changed in the engine's source reaches the baseline's destination.
        p.memory().write(p.hpa(70_000), &[0xee]).unwrap();
        let e = host.run(2).unwrap_err().to_string();
        assert!(e.contains("byte 70000"), "{e}");
    }

    #[test]
    fn memmove_needs_two_mib() {
        assert!(NestedMemmove::new(&platform(MEMMOVE_BYTES)).is_err());
    }

    #[test]
    fn streaming_misses_once_per_source_page() {
        let p = platform(256 * PAGE_SIZE);
        let count = stream_reads(&p).unwrap();
        assert_eq!(count.misses, 255);
        assert!(count.table_reads >= count.misses);
        assert!(count.reads_per_miss().unwrap() >= 1.0);
    }

    #[test]
    fn reads_per_miss_is_missing_without_counted_reads() {
        let c = StreamCount {
            misses: 10,
            table_reads: 0,
        };
        assert_eq!(c.reads_per_miss(), None);
        let c = StreamCount {
            misses: 4,
            table_reads: 10,
        };
        assert_eq!(c.reads_per_miss(), Some(2.5));
    }

    #[test]
    fn a_nested_walk_reads_24_entries() {
        let p = platform(4 * PAGE_SIZE);
        assert_eq!(nested_walk_reads(&p).unwrap(), 24);
    }
}
