//! The measurements `vsva bench` runs, as probes that each record some figures.
//!
//! A figure that no selected probe declares is listed as unmeasured (missing in the
//! table, `null` in JSON); the standard probes declare every figure.

use indicatif::{ProgressBar, ProgressStyle};
use vsva_hw::memory::PAGE_SIZE;

use super::dirty::{DirtyDomain, Harvest, WordReads, HARVEST_BYTES};
use super::dma::{
    nested_walk_reads, stream_reads, EnginesInTurn, HostCopy, NestedMemmove, TwoEngineMemmove,
    TwoEngines, MEMMOVE_BYTES,
};
use super::figures::Figure;
use super::forward::{
    ForwardedInvalidation, GuestBind, GuestCall, PageRequestRoundTrip, ResidentFill,
    UnboundMprotect,
};
use super::iommufd::{
    FaultRoundTrip, HwInfoPair, HwptInvalidate, IommufdVm, NestedAttach,
    ResidentFill as IommufdResidentFill, BATCH,
};
use super::loads::DependentLoads;
use super::measure::measure_pair_same_count;
use super::pasid::PasidChurn;
use super::platform::{Platform, PlatformConfig};
use super::report::BenchReport;
use super::socket::{SocketForwardedInvalidation, SocketPageRequest, SocketVm};
use super::steal::StealWatch;
use super::translate::{
    ColdWalks, HashMapLookups, IotlbHits, TwoThreadHits, WalkKind, WalkOnly, WORKING_SET,
};
use super::uapi::{
    BindCall, BoundPasids, CachedTranslations, HostBind, HostInvalidations, HostMap, MapCall,
    BOUND_PASIDS,
};
use super::vm::BenchVm;
use super::{measure, measure_pair, BenchError, SampleBudget, Samples, Spread};
use crate::stack::Uapi;

/// A measurement: records its figures in the report.
pub trait Probe {
    /// A short name, for the progress bar, `--only` and failure reports.
    fn name(&self) -> &'static str;

    /// The figures a successful run records.
    fn figures(&self) -> &'static [Figure];

    /// Measures with `budget` and records the figures in `report`.
    fn run(&mut self, budget: &SampleBudget, report: &mut BenchReport) -> Result<(), BenchError>;
}

/// A probe that is a plain function.
pub struct FnProbe {
    /// The probe's name ([`Probe::name`]).
    pub name: &'static str,
    /// The figures it records ([`Probe::figures`]).
    pub figures: &'static [Figure],
    /// The function that measures ([`Probe::run`]).
    pub run: fn(&SampleBudget, &mut BenchReport) -> Result<(), BenchError>,
}

impl Probe for FnProbe {
    fn name(&self) -> &'static str {
        self.name
    }

    fn figures(&self) -> &'static [Figure] {
        self.figures
    }

    fn run(&mut self, budget: &SampleBudget, report: &mut BenchReport) -> Result<(), BenchError> {
        (self.run)(budget, report)
    }
}

/// Guest buffer of the streaming measurement: 4,096 pages, each a miss.
const STREAM_BYTES: u64 = 16 << 20;

fn hit_platform() -> Result<Platform, BenchError> {
    Platform::new(PlatformConfig {
        devices: 1,
        buffer: WORKING_SET * PAGE_SIZE,
    })
}

fn iotlb_hit(budget: &SampleBudget, report: &mut BenchReport) -> Result<(), BenchError> {
    let p = hit_platform()?;
    let (hit, map) = measure_pair(
        &mut IotlbHits::new(&p)?,
        &mut HashMapLookups::new(&p)?,
        budget,
    )?;
    report.set(Figure::IotlbHitNs, hit.spread());
    report.set(Figure::HashmapLookupNs, map.spread());
    Ok(())
}

/// The speedup of each two-thread sample over the one-thread sample taken after it, so
/// that both sides of a ratio saw the same load; the median and spread of those ratios.
/// Both sides run the one-thread calibration's number of hits per thread.
fn iotlb_two_threads(budget: &SampleBudget, report: &mut BenchReport) -> Result<(), BenchError> {
    let p = hit_platform()?;
    let (two, one) = measure_pair_same_count(
        &mut TwoThreadHits::new(&p)?,
        &mut IotlbHits::new(&p)?,
        budget,
    )?;
    report.set(
        Figure::IotlbHit2ThreadsSpeedup,
        two.paired(&one, |two, one| 2.0 * one / two),
    );
    Ok(())
}

fn walk_platform() -> Result<Platform, BenchError> {
    Platform::new(PlatformConfig {
        devices: 1,
        buffer: 16 * PAGE_SIZE,
    })
}

fn cold_sl_walk(budget: &SampleBudget, report: &mut BenchReport) -> Result<(), BenchError> {
    let p = walk_platform()?;
    let (walk, loads) = measure_pair(
        &mut ColdWalks::new(&p, WalkKind::SecondLevel),
        &mut DependentLoads::new(4),
        budget,
    )?;
    report.set(Figure::SlWalkNs, walk.spread());
    report.set(Figure::DependentLoads4Ns, loads.spread());
    let alone = measure(&mut WalkOnly::new(&p, WalkKind::SecondLevel)?, budget)?;
    report.set(Figure::SlWalkOnlyNs, alone.spread());
    let miss = measure(&mut ColdWalks::misses(&p, WalkKind::SecondLevel), budget)?;
    report.set(Figure::SlMissNs, miss.spread());
    Ok(())
}

fn cold_nested_walk(budget: &SampleBudget, report: &mut BenchReport) -> Result<(), BenchError> {
    let p = walk_platform()?;
    let (walk, loads) = measure_pair(
        &mut ColdWalks::new(&p, WalkKind::Nested),
        &mut DependentLoads::new(24),
        budget,
    )?;
    report.set(Figure::NestedWalkNs, walk.spread());
    report.set(Figure::DependentLoads24Ns, loads.spread());
    let alone = measure(&mut WalkOnly::new(&p, WalkKind::Nested)?, budget)?;
    report.set(Figure::NestedWalkOnlyNs, alone.spread());
    let miss = measure(&mut ColdWalks::misses(&p, WalkKind::Nested), budget)?;
    report.set(Figure::NestedMissNs, miss.spread());
    report.set(
        Figure::NestedWalkTableReads,
        Spread::exact(nested_walk_reads(&p)? as f64),
    );
    Ok(())
}

fn streaming(_: &SampleBudget, report: &mut BenchReport) -> Result<(), BenchError> {
    let p = Platform::new(PlatformConfig {
        devices: 1,
        buffer: STREAM_BYTES,
    })?;
    let count = stream_reads(&p)?;
    let reads = count.reads_per_miss().ok_or_else(|| {
        BenchError::Check(format!(
            "the IOMMU counted no table read over {} walks",
            count.misses
        ))
    })?;
    report.set(Figure::ReadsPerMiss, Spread::exact(reads));
    Ok(())
}

fn memmove(budget: &SampleBudget, report: &mut BenchReport) -> Result<(), BenchError> {
    let p = Platform::new(PlatformConfig {
        devices: 1,
        buffer: 2 * MEMMOVE_BYTES,
    })?;
    let (nested, plain) = measure_pair(
        &mut NestedMemmove::new(&p)?,
        &mut HostCopy::new(&p)?,
        budget,
    )?;
    // Bytes per nanosecond are gigabytes per second.
    let gbps = |ns: f64| MEMMOVE_BYTES as f64 / ns;
    report.set(Figure::MemcpyNestedGbps, nested.spread().map(gbps));
    report.set(Figure::MemcpyPlainGbps, plain.spread().map(gbps));
    Ok(())
}

/// The speedup of each two-thread sample over the one-thread sample of the same copies
/// taken after it (both see the same load): the two engines' throughput summed while they
/// copy at once, over one engine's (the mean of the two alone, each on its own thread).
/// The throughputs are the medians of each side.
fn dma_two_threads(budget: &SampleBudget, report: &mut BenchReport) -> Result<(), BenchError> {
    let p = Platform::new(PlatformConfig {
        devices: 2,
        buffer: 4 * MEMMOVE_BYTES,
    })?;
    let engines = TwoEngines::new(&p)?;
    let (two, one) = measure_pair_same_count(
        &mut TwoEngineMemmove::new(&engines),
        &mut EnginesInTurn::new(&engines),
        budget,
    )?;
    // An operation is one copy on each engine.
    let bytes = 2.0 * MEMMOVE_BYTES as f64;
    report.set(Figure::Dma1ThreadGbps, one.spread().map(|ns| bytes / ns));
    report.set(Figure::Dma2ThreadsGbps, two.spread().map(|ns| bytes / ns));
    report.set(
        Figure::Dma2ThreadsSpeedup,
        two.paired(&one, |two, one| one / two),
    );
    Ok(())
}

/// Churn at 0, 50 and 99 % occupancy, each settled first ([`PasidChurn::settle`]); the
/// heap per allocated PASID at 1, 10, 50 and 99 % (each allocator filled at random
/// positions in a process where nothing else allocates meanwhile).
fn pasid_alloc(budget: &SampleBudget, report: &mut BenchReport) -> Result<(), BenchError> {
    let mut bytes = Vec::new();
    let mut record = |churn: &PasidChurn, figure| {
        if let Some(b) = churn.heap_per_pasid() {
            report.set(figure, Spread::exact(b));
            bytes.push(b);
        }
    };
    for (fraction, figure) in [
        (0.01, Figure::BytesPerPasid1),
        (0.1, Figure::BytesPerPasid10),
    ] {
        record(&PasidChurn::new(fraction)?, figure);
    }
    let mut half = PasidChurn::new(0.5)?;
    record(&half, Figure::BytesPerPasid50);
    half.settle()?;
    let n50 = measure(&mut half, budget)?;
    drop(half);
    let mut full = PasidChurn::new(0.99)?;
    record(&full, Figure::BytesPerPasid99);
    full.settle()?;
    let (n99, n0) = measure_pair(&mut full, &mut PasidChurn::new(0.0)?, budget)?;
    if bytes.len() == 4 {
        report.set(
            Figure::BytesPerPasid,
            Spread::exact(bytes.into_iter().fold(0.0, f64::max)),
        );
    }
    report.set(Figure::PasidAllocFreeNs0, n0.spread());
    report.set(Figure::PasidAllocFreeNs50, n50.spread());
    report.set(Figure::PasidAllocFreeNs99, n99.spread());
    Ok(())
}

/// The invalidations meet populated caches ([`CachedTranslations`]); the 512-page one is
/// sampled in turn with the 1-page one it is held to. Each call is followed by its checks
/// and by walks that put back what it removed (up to 512 walks, untimed), so the probe's
/// sampling is shortened ([`SampleBudget::shortened`]).
fn ioctl_invalidations(budget: &SampleBudget, report: &mut BenchReport) -> Result<(), BenchError> {
    let budget = budget.shortened();
    let vm = BenchVm::new()?;
    let cached = CachedTranslations::new(&vm)?;
    let pasid = measure(&mut HostInvalidations::pasid(&cached)?, &budget)?;
    let (n512, n1) = measure_pair(
        &mut HostInvalidations::pages(&cached, 512)?,
        &mut HostInvalidations::pages(&cached, 1)?,
        &budget,
    )?;
    report.set(Figure::PasidInvNs, pasid.spread());
    report.set(Figure::AddrInv1Ns, n1.spread());
    report.set(Figure::AddrInv512Ns, n512.spread());
    Ok(())
}

fn ioctl_bind(budget: &SampleBudget, report: &mut BenchReport) -> Result<(), BenchError> {
    let vm = BenchVm::new()?;
    let (bind, unbind) = measure_pair(
        &mut HostBind::new(&vm, BindCall::Bind)?,
        &mut HostBind::new(&vm, BindCall::Unbind)?,
        budget,
    )?;
    report.set(Figure::BindGpasidNs, bind.spread());
    report.set(Figure::UnbindGpasidNs, unbind.spread());
    Ok(())
}

fn ioctl_map(budget: &SampleBudget, report: &mut BenchReport) -> Result<(), BenchError> {
    let vm = BenchVm::new()?;
    let (map, unmap) = measure_pair(
        &mut HostMap::new(&vm, MapCall::Map)?,
        &mut HostMap::new(&vm, MapCall::Unmap)?,
        budget,
    )?;
    report.set(Figure::MapDma4kNs, map.spread());
    report.set(Figure::UnmapDma4kNs, unmap.spread());
    Ok(())
}

/// A clearing harvest of 1 GiB with 4 KiB pages against reading as many words.
fn dirty_harvest(budget: &SampleBudget, report: &mut BenchReport) -> Result<(), BenchError> {
    let d = DirtyDomain::new(HARVEST_BYTES)?;
    let (harvest, reads) = measure_pair(&mut Harvest::new(&d), &mut WordReads::new(&d), budget)?;
    report.set(Figure::DirtyHarvest1gNs, harvest.spread());
    report.set(Figure::ReadWords1gNs, reads.spread());
    Ok(())
}

/// iommufd: nested HWPT alloc + PASID attach against two ioctls that do no hardware work.
fn iommufd_nested_attach(
    budget: &SampleBudget,
    report: &mut BenchReport,
) -> Result<(), BenchError> {
    let vm = IommufdVm::new()?;
    let (attach, floor) = measure_pair(
        &mut NestedAttach::new(&vm)?,
        &mut HwInfoPair::new(&vm),
        budget,
    )?;
    report.set(Figure::NestedAllocAttachNs, attach.spread());
    report.set(Figure::HwInfoPairNs, floor.spread());
    Ok(())
}

/// iommufd: `HWPT_INVALIDATE` of 64 entries against 1, the 64 neighbouring pages (one
/// block) and then every other page (64 blocks); each call's check translates every
/// cached page, so the sampling is shortened as for the type1 invalidations.
fn iommufd_invalidate(budget: &SampleBudget, report: &mut BenchReport) -> Result<(), BenchError> {
    let budget = budget.shortened();
    let vm = IommufdVm::new()?;
    let (n64, n1) = measure_pair(
        &mut HwptInvalidate::new(&vm, BATCH, 1)?,
        &mut HwptInvalidate::new(&vm, 1, 1)?,
        &budget,
    )?;
    let (scattered, _) = measure_pair(
        &mut HwptInvalidate::new(&vm, BATCH, 2)?,
        &mut HwptInvalidate::new(&vm, 1, 1)?,
        &budget,
    )?;
    report.set(Figure::HwptInv1Ns, n1.spread());
    report.set(Figure::HwptInv64Ns, n64.spread());
    report.set(Figure::HwptInv64ScatteredNs, scattered.spread());
    Ok(())
}

/// iommufd: the fault queue round trip against the same write to a mapped page.
fn iommufd_fault(budget: &SampleBudget, report: &mut BenchReport) -> Result<(), BenchError> {
    let vm = IommufdVm::new()?;
    let (round_trip, resident) = measure_pair(
        &mut FaultRoundTrip::new(&vm)?,
        &mut IommufdResidentFill::new(&vm),
        budget,
    )?;
    report.set(Figure::FaultRoundtripNs, round_trip.spread());
    report.set(Figure::FaultFillResidentNs, resident.spread());
    Ok(())
}

/// On a new VM, so that the PASID tables the bound PASIDs need are counted.
fn bound_pasid_bytes(_: &SampleBudget, report: &mut BenchReport) -> Result<(), BenchError> {
    let vm = BenchVm::new()?;
    if let Some(m) = BoundPasids::new(&vm, BOUND_PASIDS)?.memory() {
        report.set(Figure::BytesPerBoundPasid, Spread::exact(m.per_pasid()));
    }
    Ok(())
}

/// `fwd_inv_ns` is one notifier invalidation over the descriptor-and-wait pairs it
/// forwards (an IOTLB and a device-TLB one).
fn forwarded_invalidation(
    budget: &SampleBudget,
    report: &mut BenchReport,
) -> Result<(), BenchError> {
    let vm = BenchVm::new()?;
    let mut fwd = ForwardedInvalidation::new(&vm)?;
    let (notifier, unbound) = measure_pair(&mut fwd, &mut UnboundMprotect::new(&vm)?, budget)?;
    let waits = fwd.waits_per_op() as f64;
    report.set(Figure::FwdInvNs, notifier.spread().map(|ns| ns / waits));
    report.set(Figure::FwdNotifierNs, notifier.spread());
    report.set(Figure::MprotectUnboundNs, unbound.spread());
    Ok(())
}

fn guest_bind(budget: &SampleBudget, report: &mut BenchReport) -> Result<(), BenchError> {
    let vm = BenchVm::new()?;
    let (bind, unbind) = measure_pair(
        &mut GuestBind::new(&vm, GuestCall::Bind)?,
        &mut GuestBind::new(&vm, GuestCall::Unbind)?,
        budget,
    )?;
    report.set(Figure::GuestBindNs, bind.spread());
    report.set(Figure::GuestUnbindNs, unbind.spread());
    Ok(())
}

fn page_request(budget: &SampleBudget, report: &mut BenchReport) -> Result<(), BenchError> {
    let vm = BenchVm::new()?;
    let (round_trip, resident) = measure_pair(
        &mut PageRequestRoundTrip::new(&vm)?,
        &mut ResidentFill::new(&vm),
        budget,
    )?;
    report.set(Figure::PrqRoundtripNs, round_trip.spread());
    report.set(Figure::FillResidentNs, resident.spread());
    Ok(())
}

/// Issue 11: the forwarded invalidation with the vIOMMU over iommufd (the guest's IOTLB
/// descriptor as one `IOMMU_HWPT_INVALIDATE` of the PASID's nested HWPT) and over the
/// type1 container (`VFIO_IOMMU_CACHE_INVALIDATE`), sampled in turn in one run; each
/// operation checked to forward every descriptor it waits for.
fn iommufd_forwarded(budget: &SampleBudget, report: &mut BenchReport) -> Result<(), BenchError> {
    let over_iommufd = BenchVm::with_uapi(Uapi::Iommufd)?;
    let over_type1 = BenchVm::new()?;
    if (over_iommufd.vm().uapi(), over_type1.vm().uapi()) != (Uapi::Iommufd, Uapi::Type1) {
        return Err(BenchError::Check("the VMs are not on the two uAPIs".into()));
    }
    let mut iommufd = ForwardedInvalidation::new(&over_iommufd)?;
    let mut type1 = ForwardedInvalidation::new(&over_type1)?;
    let (iommufd_waits, type1_waits) = (iommufd.waits_per_op() as f64, type1.waits_per_op() as f64);
    let (on_iommufd, on_type1) = measure_pair(&mut iommufd, &mut type1, budget)?;
    report.set(
        Figure::IommufdFwdInvNs,
        on_iommufd.spread().map(|ns| ns / iommufd_waits),
    );
    report.set(
        Figure::IommufdFwdInvRatio,
        on_iommufd.paired(&on_type1, |i, t| (i / iommufd_waits) / (t / type1_waits)),
    );
    Ok(())
}

/// Issue 12: the forwarded invalidation and the page request round trip with the host
/// served over a UNIX socket by a thread of this process, each sampled in turn with its
/// in-process twin; the ratios are the socket's overhead.
///
/// Over [`SOCKET_INSTANCES`] instances in turn (a new service, VM and connection, and a
/// new in-process twin, each given that share of the samples), the figures being the
/// medians of all their samples. One instance's medians differ from another's by up to an
/// eighth (twelve single-instance quick runs, idle: 1348-1522 ns a forwarded
/// invalidation), while one instance sampled six times in turn, full and quick, agrees
/// with itself within 2 %; so a figure of one instance was that instance's, and a quick
/// and a full run, each with its own, disagreed by what lay between the two (in stop 28's
/// idle pair by 12 %, and in two of three idle pairs with the wake-up untimed). Each
/// instance puts the lines the two threads share at new addresses: a cache line bounced
/// between the same two CPUs, new in each run, took 247-310 ns a round trip from one run
/// to the next.
fn socket_forwarded(budget: &SampleBudget, report: &mut BenchReport) -> Result<(), BenchError> {
    let share = budget.split(SOCKET_INSTANCES);
    let (mut socket, mut local_inv) = (Samples::default(), Samples::default());
    let (mut socket_prq, mut local_prq) = (Samples::default(), Samples::default());
    let mut waits = None;
    for _ in 0..SOCKET_INSTANCES {
        let remote = SocketVm::new()?;
        let local = BenchVm::new()?;
        let mut over_socket = SocketForwardedInvalidation::new(&remote)?;
        let mut in_process = ForwardedInvalidation::new(&local)?;
        let these = (over_socket.waits_per_op(), in_process.waits_per_op());
        if *waits.get_or_insert(these) != these {
            return Err(BenchError::Check(
                "the instances' mprotect forwarded different numbers of invalidations".into(),
            ));
        }
        let (s, l) = measure_pair(&mut over_socket, &mut in_process, &share)?;
        socket.append(s);
        local_inv.append(l);
        let (s, l) = measure_pair(
            &mut SocketPageRequest::new(&remote)?,
            &mut PageRequestRoundTrip::new(&local)?,
            &share,
        )?;
        socket_prq.append(s);
        local_prq.append(l);
    }
    let Some((socket_waits, local_waits)) = waits.map(|(s, l)| (s as f64, l as f64)) else {
        return Err(BenchError::Check("no socket instance was sampled".into()));
    };
    report.set(
        Figure::SocketFwdInvNs,
        socket.spread().map(|ns| ns / socket_waits),
    );
    report.set(
        Figure::SocketFwdInvRatio,
        socket.paired(&local_inv, |s, l| (s / socket_waits) / (l / local_waits)),
    );
    report.set(Figure::SocketPrqNs, socket_prq.spread());
    report.set(
        Figure::SocketPrqRatio,
        socket_prq.paired(&local_prq, |s, l| s / l),
    );
    Ok(())
}

/// Instances of the socket probe's VMs, each sampled for a share of the samples.
const SOCKET_INSTANCES: usize = 10;

/// Every measurement, in report order.
pub fn standard_probes() -> Vec<Box<dyn Probe>> {
    use Figure::*;
    let probe = |name, figures, run| -> Box<dyn Probe> { Box::new(FnProbe { name, figures, run }) };
    vec![
        probe("iotlb-hit", &[IotlbHitNs, HashmapLookupNs], iotlb_hit),
        probe(
            "iotlb-hit-2-threads",
            &[IotlbHit2ThreadsSpeedup],
            iotlb_two_threads,
        ),
        probe(
            "cold-sl-walk",
            &[SlWalkNs, SlWalkOnlyNs, DependentLoads4Ns, SlMissNs],
            cold_sl_walk,
        ),
        probe(
            "cold-nested-walk",
            &[
                NestedWalkNs,
                NestedWalkOnlyNs,
                DependentLoads24Ns,
                NestedWalkTableReads,
                NestedMissNs,
            ],
            cold_nested_walk,
        ),
        probe("streaming-dma", &[ReadsPerMiss], streaming),
        probe(
            "nested-memmove",
            &[MemcpyNestedGbps, MemcpyPlainGbps],
            memmove,
        ),
        probe(
            "dma-2-threads",
            &[Dma1ThreadGbps, Dma2ThreadsGbps, Dma2ThreadsSpeedup],
            dma_two_threads,
        ),
        probe(
            "pasid-alloc-free",
            &[
                PasidAllocFreeNs0,
                PasidAllocFreeNs50,
                PasidAllocFreeNs99,
                BytesPerPasid,
                BytesPerPasid1,
                BytesPerPasid10,
                BytesPerPasid50,
                BytesPerPasid99,
            ],
            pasid_alloc,
        ),
        probe(
            "ioctl-invalidate",
            &[PasidInvNs, AddrInv1Ns, AddrInv512Ns],
            ioctl_invalidations,
        ),
        probe("ioctl-bind", &[BindGpasidNs, UnbindGpasidNs], ioctl_bind),
        probe("ioctl-map", &[MapDma4kNs, UnmapDma4kNs], ioctl_map),
        probe(
            "bound-pasid-bytes",
            &[BytesPerBoundPasid],
            bound_pasid_bytes,
        ),
        probe(
            "forwarded-invalidation",
            &[FwdInvNs, FwdNotifierNs, MprotectUnboundNs],
            forwarded_invalidation,
        ),
        probe("guest-bind", &[GuestBindNs, GuestUnbindNs], guest_bind),
        probe(
            "page-request",
            &[PrqRoundtripNs, FillResidentNs],
            page_request,
        ),
        probe(
            "dirty-harvest",
            &[DirtyHarvest1gNs, ReadWords1gNs],
            dirty_harvest,
        ),
        probe(
            "iommufd-nested-attach",
            &[NestedAllocAttachNs, HwInfoPairNs],
            iommufd_nested_attach,
        ),
        probe(
            "iommufd-invalidate",
            &[HwptInv1Ns, HwptInv64Ns, HwptInv64ScatteredNs],
            iommufd_invalidate,
        ),
        probe(
            "iommufd-fault",
            &[FaultRoundtripNs, FaultFillResidentNs],
            iommufd_fault,
        ),
        probe(
            "iommufd-forwarded",
            &[IommufdFwdInvNs, IommufdFwdInvRatio],
            iommufd_forwarded,
        ),
        probe(
            "socket-forwarded",
            &[
                SocketFwdInvNs,
                SocketFwdInvRatio,
                SocketPrqNs,
                SocketPrqRatio,
            ],
            socket_forwarded,
        ),
    ]
}

/// How to run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BenchOptions {
    /// Short sampling ([`SampleBudget::QUICK`]).
    pub quick: bool,
    /// Run only the probes whose name contains this.
    pub only: Option<String>,
    /// Show a progress bar on standard error (when it is a terminal).
    pub progress: bool,
}

/// Runs the standard probes.
pub fn run(opts: &BenchOptions) -> BenchReport {
    run_probes(opts, standard_probes())
}

/// Runs the standard probes twice over, for `vsva bench --compare-quick`: each probe in
/// full and then at once quick, before the next probe runs, so that the two figures of a
/// pair differ in their sampling length and not in what ran in the process before them
/// or in the machine's load minutes apart. Returns the full and the quick report.
pub fn run_paired(opts: &BenchOptions) -> [BenchReport; 2] {
    let [full, quick] = run_budgets(
        opts,
        standard_probes(),
        [SampleBudget::FULL, SampleBudget::QUICK],
    );
    [full, quick]
}

/// Runs `probes`. A probe that fails leaves its figures missing and is listed in the
/// report's failures; the others still run.
pub fn run_probes(opts: &BenchOptions, probes: Vec<Box<dyn Probe>>) -> BenchReport {
    let budget = if opts.quick {
        SampleBudget::QUICK
    } else {
        SampleBudget::FULL
    };
    let [report] = run_budgets(opts, probes, [budget]);
    report
}

/// Runs each selected probe once with each budget in turn, into one report per budget
/// (`opts.quick` is not read: the budgets say how long to sample).
fn run_budgets<const N: usize>(
    opts: &BenchOptions,
    probes: Vec<Box<dyn Probe>>,
    budgets: [SampleBudget; N],
) -> [BenchReport; N] {
    let selected: Vec<_> = probes
        .into_iter()
        .filter(|p| opts.only.as_deref().is_none_or(|o| p.name().contains(o)))
        .collect();
    let bar = if opts.progress {
        ProgressBar::new((selected.len() * N) as u64)
    } else {
        ProgressBar::hidden()
    };
    if let Ok(style) = ProgressStyle::with_template("[{elapsed}] {bar:30} {pos}/{len} {msg}") {
        bar.set_style(style);
    }
    let mut reports = budgets.map(|b| {
        let mut report = BenchReport::new(b == SampleBudget::QUICK);
        report.unmeasured = Figure::ALL
            .iter()
            .copied()
            .filter(|f| !selected.iter().any(|p| p.figures().contains(f)))
            .collect();
        report
    });
    for mut probe in selected {
        bar.set_message(probe.name());
        for (budget, report) in budgets.iter().zip(&mut reports) {
            run_one(&mut *probe, budget, report);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    reports
}

/// Runs `probe` into `report`, recording a failure if it fails or leaves one of its
/// figures unrecorded.
fn run_one(probe: &mut dyn Probe, budget: &SampleBudget, report: &mut BenchReport) {
    let watch = StealWatch::start();
    let ran = probe.run(budget, report);
    report.steal.push(watch.stop(probe.name()));
    match ran {
        Err(e) => report.fail(probe.name(), e),
        Ok(()) => {
            let absent: Vec<_> = probe
                .figures()
                .iter()
                .filter(|f| report.get(**f).is_none())
                .map(|f| f.key())
                .collect();
            if !absent.is_empty() {
                report.fail(probe.name(), format!("recorded no {}", absent.join(", ")));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(_: &SampleBudget, r: &mut BenchReport) -> Result<(), BenchError> {
        r.set(Figure::FwdInvNs, Spread::exact(1500.0));
        Ok(())
    }

    fn fails(_: &SampleBudget, _: &mut BenchReport) -> Result<(), BenchError> {
        Err(BenchError::Check("no model".into()))
    }

    fn probes() -> Vec<Box<dyn Probe>> {
        vec![
            Box::new(FnProbe {
                name: "fails",
                figures: &[Figure::GuestBindNs],
                run: fails,
            }),
            Box::new(FnProbe {
                name: "records",
                figures: &[Figure::FwdInvNs],
                run: records,
            }),
            Box::new(FnProbe {
                name: "forgets",
                figures: &[Figure::PrqRoundtripNs],
                run: |_, _| Ok(()),
            }),
        ]
    }

    #[test]
    fn failures_are_reported_and_do_not_stop_the_run() {
        let r = run_probes(&BenchOptions::default(), probes());
        assert_eq!(r.get(Figure::FwdInvNs), Some(1500.0));
        assert_eq!(
            r.failures,
            vec![
                ("fails".to_string(), "check failed: no model".to_string()),
                (
                    "forgets".to_string(),
                    "recorded no prq_roundtrip_ns".to_string()
                )
            ]
        );
        assert_eq!(r.unmeasured.len(), Figure::ALL.len() - 3);
        assert!(!r.unmeasured.contains(&Figure::GuestBindNs));
    }

    #[test]
    fn only_selects_probes_by_name() {
        let opts = BenchOptions {
            only: Some("rec".into()),
            ..BenchOptions::default()
        };
        let r = run_probes(&opts, probes());
        assert!(r.failures.is_empty());
        assert_eq!(r.get(Figure::FwdInvNs), Some(1500.0));
        assert!(r.unmeasured.contains(&Figure::GuestBindNs));
    }

    std::thread_local! {
        static RUNS: std::cell::RefCell<Vec<(&'static str, usize)>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }

    fn logs_first(b: &SampleBudget, r: &mut BenchReport) -> Result<(), BenchError> {
        RUNS.with(|runs| runs.borrow_mut().push(("first", b.samples)));
        r.set(Figure::FwdInvNs, Spread::exact(b.samples as f64));
        Ok(())
    }

    fn logs_second(b: &SampleBudget, r: &mut BenchReport) -> Result<(), BenchError> {
        RUNS.with(|runs| runs.borrow_mut().push(("second", b.samples)));
        r.set(Figure::GuestBindNs, Spread::exact(b.samples as f64));
        Ok(())
    }

    #[test]
    fn paired_budgets_run_each_probe_in_both_before_the_next() {
        let probes: Vec<Box<dyn Probe>> = vec![
            Box::new(FnProbe {
                name: "first",
                figures: &[Figure::FwdInvNs],
                run: logs_first,
            }),
            Box::new(FnProbe {
                name: "second",
                figures: &[Figure::GuestBindNs],
                run: logs_second,
            }),
        ];
        let [full, quick] = run_budgets(
            &BenchOptions::default(),
            probes,
            [SampleBudget::FULL, SampleBudget::QUICK],
        );
        let (f, q) = (SampleBudget::FULL.samples, SampleBudget::QUICK.samples);
        assert_ne!(f, q);
        let runs = RUNS.with(|runs| runs.take());
        assert_eq!(
            runs,
            vec![("first", f), ("first", q), ("second", f), ("second", q)]
        );
        assert!(!full.quick && quick.quick);
        assert_eq!(full.get(Figure::FwdInvNs), Some(f as f64));
        assert_eq!(quick.get(Figure::FwdInvNs), Some(q as f64));
        assert_eq!(quick.get(Figure::GuestBindNs), Some(q as f64));
        assert!(full.failures.is_empty() && quick.failures.is_empty());
    }

    #[test]
    fn standard_probes_measure_every_figure_once() {
        let probes = standard_probes();
        let names: std::collections::HashSet<_> = probes.iter().map(|p| p.name()).collect();
        assert_eq!(names.len(), probes.len());
        for f in Figure::ALL {
            let by = probes.iter().filter(|p| p.figures().contains(f)).count();
            assert_eq!(by, 1, "{} is measured by {by} probes", f.key());
        }
    }
}
