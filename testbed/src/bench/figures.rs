//! The figures `vsva bench` reports (issue 6's JSON keys) and the goals they are held to.

/// How a figure is expressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Unit {
    /// Nanoseconds per operation.
    Nanoseconds,
    /// A ratio of two throughputs.
    Times,
    /// Page-table entries read.
    Reads,
    /// Throughput in 10^9 bytes per second.
    GigabytesPerSecond,
    /// A memory footprint in bytes.
    Bytes,
}

impl Unit {
    /// The symbol printed after a value.
    pub const fn symbol(self) -> &'static str {
        match self {
            Unit::Nanoseconds => "ns",
            Unit::Times => "×",
            Unit::Reads => "reads",
            Unit::GigabytesPerSecond => "GB/s",
            Unit::Bytes => "B",
        }
    }
}

macro_rules! figures {
    ($($(#[$doc:meta])* $name:ident => $key:literal, $unit:ident;)*) => {
        /// A figure of the report, by its JSON key.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Figure {
            $($(#[$doc])* $name,)*
        }

        impl Figure {
            /// Every figure, in report order.
            pub const ALL: &'static [Figure] = &[$(Figure::$name),*];

            /// The JSON key.
            pub const fn key(self) -> &'static str {
                match self {
                    $(Figure::$name => $key,)*
                }
            }

            /// The unit of its value.
            pub const fn unit(self) -> Unit {
                match self {
                    $(Figure::$name => Unit::$unit,)*
                }
            }
        }
    };
}

figures! {
    /// A nested translation served by the IOTLB (random hits over 1,024 pages).
    IotlbHitNs => "iotlb_hit_ns", Nanoseconds;
    /// The same lookups in a `HashMap<(u16, u32, u64), u64>` with foldhash.
    HashmapLookupNs => "hashmap_lookup_ns", Nanoseconds;
    /// Hit throughput of two threads sharing the IOMMU over one thread's.
    IotlbHit2ThreadsSpeedup => "iotlb_hit_2threads_speedup", Times;
    /// A second-level translation with every IOMMU cache empty: context and PASID entries
    /// read, the walk, and the fills of every cache it passes.
    SlWalkNs => "sl_walk_ns", Nanoseconds;
    /// The second-level walk alone: the walker over the same tables, no cache looked up
    /// or filled.
    SlWalkOnlyNs => "sl_walk_only_ns", Nanoseconds;
    /// Four dependent loads in four pages.
    DependentLoads4Ns => "dependent_loads_4_ns", Nanoseconds;
    /// A nested translation (4-level over 4-level) with every IOMMU cache empty: entries,
    /// walk and fills, as `sl_walk_ns`.
    NestedWalkNs => "nested_walk_ns", Nanoseconds;
    /// The nested walk alone (24 table reads), no cache looked up or filled.
    NestedWalkOnlyNs => "nested_walk_only_ns", Nanoseconds;
    /// Twenty-four dependent loads in twenty-four pages.
    DependentLoads24Ns => "dependent_loads_24_ns", Nanoseconds;
    /// Mean table reads per IOTLB miss while streaming 4 KiB DMA.
    ReadsPerMiss => "reads_per_miss", Reads;
    /// DMA engine memmove of 1 MiB through nested translation, IOTLB warm.
    MemcpyNestedGbps => "memcpy_nested_gbps", GigabytesPerSecond;
    /// The CPU's copy of the same 1 MiB of host memory (the memmove's baseline).
    MemcpyPlainGbps => "memcpy_plain_gbps", GigabytesPerSecond;
    /// DMA throughput on one thread: 1 MiB memmoves through nested translation, IOTLB
    /// warm, of the two engines of the two-thread figure in turn.
    Dma1ThreadGbps => "dma_1thread_gbps", GigabytesPerSecond;
    /// DMA throughput of two engines (two devices and domains) on two threads, one shared
    /// IOMMU, both copying at once.
    Dma2ThreadsGbps => "dma_2threads_gbps", GigabytesPerSecond;
    /// Two-thread DMA throughput over one thread's, from paired samples.
    Dma2ThreadsSpeedup => "dma_2threads_speedup", Times;
    /// PASID-selective `VFIO_IOMMU_CACHE_INVALIDATE` (IOTLB) through the ioctl path, with
    /// its wait.
    PasidInvNs => "pasid_inv_ns", Nanoseconds;
    /// 1-page address invalidation through the ioctl path, with its wait.
    AddrInv1Ns => "addr_inv_1_ns", Nanoseconds;
    /// 512-page address invalidation through the ioctl path, with its wait.
    AddrInv512Ns => "addr_inv_512_ns", Nanoseconds;
    /// `VFIO_IOMMU_BIND` of a guest PASID with its invalidations.
    BindGpasidNs => "bind_gpasid_ns", Nanoseconds;
    /// `VFIO_IOMMU_UNBIND` of a guest PASID with its invalidations.
    UnbindGpasidNs => "unbind_gpasid_ns", Nanoseconds;
    /// `VFIO_IOMMU_MAP_DMA` of 4 KiB, with its invalidation.
    MapDma4kNs => "map_dma_4k_ns", Nanoseconds;
    /// `VFIO_IOMMU_UNMAP_DMA` of 4 KiB, with its invalidations.
    UnmapDma4kNs => "unmap_dma_4k_ns", Nanoseconds;
    /// A guest invalidation descriptor and its wait, forwarded through vIOMMU, VMM and
    /// host to the IOMMU, wait seen by the guest: an mmu-notifier invalidation of one page
    /// over the descriptor-and-wait pairs it submits.
    FwdInvNs => "fwd_inv_ns", Nanoseconds;
    /// Guest-visible bind: PASID entry and flushes, shadowed to a host bind.
    GuestBindNs => "guest_bind_ns", Nanoseconds;
    /// Page request round trip from device fault to successful retry: a device fill of
    /// one unmapped page, from portal write to completion record read.
    PrqRoundtripNs => "prq_roundtrip_ns", Nanoseconds;
    /// A PASID allocated at a random position and one freed at a random position, with
    /// the space empty.
    PasidAllocFreeNs0 => "pasid_alloc_free_ns_0", Nanoseconds;
    /// The same with half the space allocated at random positions.
    PasidAllocFreeNs50 => "pasid_alloc_free_ns_50", Nanoseconds;
    /// The same with 99 % of the space allocated at random positions.
    PasidAllocFreeNs99 => "pasid_alloc_free_ns_99", Nanoseconds;
    /// Heap bytes per allocated PASID: the most of `bytes_per_pasid_{1,10,50,99}`.
    BytesPerPasid => "bytes_per_pasid", Bytes;
    /// Bytes per bound PASID (host heap and PASID tables), allocation and PASID entry
    /// included.
    BytesPerBoundPasid => "bytes_per_bound_pasid", Bytes;
    /// Entries one nested walk reads in the vtd walker alone (no cache), for comparison
    /// with `reads_per_miss`.
    NestedWalkTableReads => "nested_walk_table_reads", Reads;
    /// A second-level translation after an IOTLB miss: IOTLB and paging-structure caches
    /// empty, context and PASID caches warm.
    SlMissNs => "sl_miss_ns", Nanoseconds;
    /// A nested translation after an IOTLB miss: IOTLB and paging-structure caches empty,
    /// context and PASID caches warm.
    NestedMissNs => "nested_miss_ns", Nanoseconds;
    /// The whole mmu-notifier invalidation `fwd_inv_ns` divides: a process's `mprotect` of
    /// one page, with its forwarded IOTLB and device-TLB invalidations.
    FwdNotifierNs => "fwd_notifier_ns", Nanoseconds;
    /// The same `mprotect` in a process bound to no device (no invalidation).
    MprotectUnboundNs => "mprotect_unbound_ns", Nanoseconds;
    /// Guest-visible unbind: PASID entry cleared, flushes, drain, shadowed to a host unbind.
    GuestUnbindNs => "guest_unbind_ns", Nanoseconds;
    /// The page request round trip's fill, of a resident page (no page request).
    FillResidentNs => "fill_resident_ns", Nanoseconds;
    /// Heap bytes per allocated PASID, fixed tables included, with 1 % of the space
    /// allocated at random positions.
    BytesPerPasid1 => "bytes_per_pasid_1", Bytes;
    /// The same at 10 %.
    BytesPerPasid10 => "bytes_per_pasid_10", Bytes;
    /// The same at 50 %.
    BytesPerPasid50 => "bytes_per_pasid_50", Bytes;
    /// The same at 99 %.
    BytesPerPasid99 => "bytes_per_pasid_99", Bytes;
    /// A dirty-bitmap harvest (`GET_DIRTY_BITMAP`, clearing, with its IOTLB flush) of
    /// 1 GiB mapped with 4 KiB pages, one page in 64 dirty.
    DirtyHarvest1gNs => "dirty_harvest_1g_ns", Nanoseconds;
    /// The same number of 64-bit words (the 262,144 leaf entries) read one by one.
    ReadWords1gNs => "read_words_1g_ns", Nanoseconds;
    /// iommufd: `IOMMU_HWPT_ALLOC` of a nested HWPT (VT-d stage 1 over a nest parent) and
    /// its `VFIO_DEVICE_ATTACH_IOMMUFD_PT` at a PASID, through the byte-level ioctls.
    NestedAllocAttachNs => "nested_alloc_attach_ns", Nanoseconds;
    /// Two `IOMMU_GET_HW_INFO` calls: the iommufd uAPI path of two ioctls, no hardware work.
    HwInfoPairNs => "hw_info_pair_ns", Nanoseconds;
    /// `IOMMU_HWPT_INVALIDATE` of a nested HWPT carrying 1 stage-1 entry (one page).
    HwptInv1Ns => "hwpt_inv_1_ns", Nanoseconds;
    /// The same carrying 64 entries (one page each), neighbouring pages: one block.
    HwptInv64Ns => "hwpt_inv_64_ns", Nanoseconds;
    /// The same carrying 64 entries of every other page: 64 blocks, each a PASID-based
    /// IOTLB and a device-TLB invalidation descriptor.
    HwptInv64ScatteredNs => "hwpt_inv_64_scattered_ns", Nanoseconds;
    /// iommufd fault round trip: a device write to an unmapped page, its record read from
    /// the fault queue file, the page mapped, the response written, the retry landed.
    FaultRoundtripNs => "fault_roundtrip_ns", Nanoseconds;
    /// The same device write to a mapped page (no fault).
    FaultFillResidentNs => "fault_fill_resident_ns", Nanoseconds;
    /// A forwarded invalidation whose `VFIO_IOMMU_CACHE_INVALIDATE` crosses a UNIX socket
    /// to a `vsva host` service: an mmu-notifier invalidation of one page over the
    /// invalidations it forwards (issue 12).
    SocketFwdInvNs => "socket_fwd_inv_ns", Nanoseconds;
    /// The socket's overhead: [`Figure::SocketFwdInvNs`] over the same invalidation
    /// forwarded to a host in the same process, sampled in turn.
    SocketFwdInvRatio => "socket_fwd_inv_ratio", Times;
    /// Page request round trip across the socket: a device fill of one unmapped page, the
    /// request read from the host's fault queue and the response written over the socket.
    SocketPrqNs => "socket_prq_ns", Nanoseconds;
    /// [`Figure::SocketPrqNs`] over the same round trip in one process, sampled in turn.
    SocketPrqRatio => "socket_prq_ratio", Times;
    /// A forwarded invalidation with the vIOMMU over iommufd: an mmu-notifier
    /// invalidation of one page over the invalidations it forwards, the guest's IOTLB
    /// descriptor reaching the host as one `IOMMU_HWPT_INVALIDATE` of the nested HWPT at
    /// the process's PASID (issue 11).
    IommufdFwdInvNs => "iommufd_fwd_inv_ns", Nanoseconds;
    /// [`Figure::IommufdFwdInvNs`] over the same invalidation forwarded as
    /// `VFIO_IOMMU_CACHE_INVALIDATE` to a type1 container, sampled in turn.
    IommufdFwdInvRatio => "iommufd_fwd_inv_ratio", Times;
}

/// The limit a goal puts on its compared value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Bound {
    /// The value must not exceed the limit.
    AtMost(f64),
    /// The value must reach at least the limit.
    AtLeast(f64),
}

impl Bound {
    /// Whether `value` meets the bound.
    pub fn holds(self, value: f64) -> bool {
        match self {
            Bound::AtMost(limit) => value <= limit,
            Bound::AtLeast(limit) => value >= limit,
        }
    }

    /// The limit.
    pub const fn limit(self) -> f64 {
        match self {
            Bound::AtMost(l) | Bound::AtLeast(l) => l,
        }
    }

    /// How far `value` is from the limit, oriented so that 1 is the limit and below 1
    /// meets it.
    pub fn score(self, value: f64) -> f64 {
        match self {
            Bound::AtMost(limit) => value / limit,
            Bound::AtLeast(limit) => limit / value,
        }
    }
}

/// A speed or size goal of issue 6: `figure` (divided by `baseline` when there is one)
/// must meet `bound`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Goal {
    /// The goal's label in the report.
    pub name: &'static str,
    /// The measured figure.
    pub figure: Figure,
    /// The figure `figure` is divided by, for a relative goal.
    pub baseline: Option<Figure>,
    /// The limit the compared value must meet.
    pub bound: Bound,
}

const fn ratio(name: &'static str, figure: Figure, baseline: Figure, bound: Bound) -> Goal {
    Goal {
        name,
        figure,
        baseline: Some(baseline),
        bound,
    }
}

const fn absolute(name: &'static str, figure: Figure, bound: Bound) -> Goal {
    Goal {
        name,
        figure,
        baseline: None,
        bound,
    }
}

use Bound::{AtLeast, AtMost};
use Figure::*;

/// Every goal, in report order.
pub const GOALS: &[Goal] = &[
    ratio(
        "IOTLB hit vs hash map",
        IotlbHitNs,
        HashmapLookupNs,
        AtMost(2.0),
    ),
    absolute(
        "IOTLB hits, 2 threads",
        IotlbHit2ThreadsSpeedup,
        AtLeast(1.6),
    ),
    ratio(
        "SL walk alone vs 4 loads",
        SlWalkOnlyNs,
        DependentLoads4Ns,
        AtMost(3.0),
    ),
    ratio(
        "cold SL walk+fills vs 4 loads",
        SlWalkNs,
        DependentLoads4Ns,
        AtMost(10.0),
    ),
    ratio(
        "nested walk alone vs 24 loads",
        NestedWalkOnlyNs,
        DependentLoads24Ns,
        AtMost(3.0),
    ),
    ratio(
        "cold nested walk+fills vs 24 loads",
        NestedWalkNs,
        DependentLoads24Ns,
        AtMost(6.0),
    ),
    absolute("reads per IOTLB miss", ReadsPerMiss, AtMost(2.5)),
    ratio(
        "nested DMA memmove vs memcpy",
        MemcpyNestedGbps,
        MemcpyPlainGbps,
        AtLeast(0.9),
    ),
    absolute(
        "DMA throughput, 2 threads",
        Dma2ThreadsSpeedup,
        AtLeast(1.8),
    ),
    absolute("PASID-selective invalidation", PasidInvNs, AtMost(1000.0)),
    absolute("1-page address invalidation", AddrInv1Ns, AtMost(1000.0)),
    ratio(
        "512-page vs 1-page invalidation",
        AddrInv512Ns,
        AddrInv1Ns,
        AtMost(4.0),
    ),
    absolute("bind guest PASID", BindGpasidNs, AtMost(2000.0)),
    absolute("unbind guest PASID", UnbindGpasidNs, AtMost(2000.0)),
    absolute("MAP_DMA 4 KiB", MapDma4kNs, AtMost(1000.0)),
    absolute("UNMAP_DMA 4 KiB", UnmapDma4kNs, AtMost(1500.0)),
    absolute("forwarded invalidation", FwdInvNs, AtMost(700.0)),
    absolute("guest-visible bind", GuestBindNs, AtMost(2000.0)),
    absolute("page request round trip", PrqRoundtripNs, AtMost(2000.0)),
    absolute("PASID alloc+free, 0 %", PasidAllocFreeNs0, AtMost(100.0)),
    absolute("PASID alloc+free, 50 %", PasidAllocFreeNs50, AtMost(100.0)),
    absolute("PASID alloc+free, 99 %", PasidAllocFreeNs99, AtMost(100.0)),
    ratio(
        "PASID alloc+free, 99 % vs 0 %",
        PasidAllocFreeNs99,
        PasidAllocFreeNs0,
        AtMost(1.5),
    ),
    absolute(
        "bytes per allocated PASID, 1 %",
        BytesPerPasid1,
        AtMost(64.0),
    ),
    absolute(
        "bytes per allocated PASID, 10 %",
        BytesPerPasid10,
        AtMost(64.0),
    ),
    absolute(
        "bytes per allocated PASID, 50 %",
        BytesPerPasid50,
        AtMost(64.0),
    ),
    absolute(
        "bytes per allocated PASID, 99 %",
        BytesPerPasid99,
        AtMost(64.0),
    ),
    absolute("bytes per bound PASID", BytesPerBoundPasid, AtMost(256.0)),
    absolute(
        "forwarded invalidation over a socket",
        SocketFwdInvNs,
        AtMost(5000.0),
    ),
    absolute(
        "page request round trip over a socket",
        SocketPrqNs,
        AtMost(10000.0),
    ),
    ratio(
        "dirty harvest of 1 GiB vs reading its words",
        DirtyHarvest1gNs,
        ReadWords1gNs,
        AtMost(3.0),
    ),
    ratio(
        "HWPT_INVALIDATE 64 vs 1 entry",
        HwptInv64Ns,
        HwptInv1Ns,
        AtMost(4.0),
    ),
    ratio(
        "HWPT_INVALIDATE 64 scattered vs 1 entry",
        HwptInv64ScatteredNs,
        HwptInv1Ns,
        AtMost(4.0),
    ),
];

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn keys_are_unique_snake_case() {
        let keys: HashSet<_> = Figure::ALL.iter().map(|f| f.key()).collect();
        assert_eq!(keys.len(), Figure::ALL.len());
        assert!(keys.iter().all(|k| k
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')));
    }

    #[test]
    fn every_key_of_the_issue_is_a_figure() {
        let issue = [
            "iotlb_hit_ns",
            "hashmap_lookup_ns",
            "iotlb_hit_2threads_speedup",
            "sl_walk_ns",
            "sl_walk_only_ns",
            "dependent_loads_4_ns",
            "nested_walk_ns",
            "nested_walk_only_ns",
            "dependent_loads_24_ns",
            "reads_per_miss",
            "memcpy_nested_gbps",
            "memcpy_plain_gbps",
            "dma_2threads_speedup",
            "pasid_inv_ns",
            "addr_inv_1_ns",
            "addr_inv_512_ns",
            "bind_gpasid_ns",
            "unbind_gpasid_ns",
            "map_dma_4k_ns",
            "unmap_dma_4k_ns",
            "fwd_inv_ns",
            "guest_bind_ns",
            "prq_roundtrip_ns",
            "pasid_alloc_free_ns_0",
            "pasid_alloc_free_ns_50",
            "pasid_alloc_free_ns_99",
            "bytes_per_pasid",
            "bytes_per_bound_pasid",
        ];
        for key in issue {
            assert!(Figure::ALL.iter().any(|f| f.key() == key), "{key}");
        }
    }

    #[test]
    fn bounds_and_scores_agree() {
        for (bound, value) in [
            (AtMost(2.0), 1.0),
            (AtMost(2.0), 3.0),
            (AtLeast(1.6), 2.0),
            (AtLeast(1.6), 1.0),
        ] {
            assert_eq!(bound.holds(value), bound.score(value) <= 1.0);
        }
        assert!(AtMost(2.0).holds(2.0) && AtLeast(0.9).holds(0.9));
    }

    #[test]
    fn a_ratio_goal_never_divides_by_itself() {
        assert!(GOALS.iter().all(|g| g.baseline != Some(g.figure)));
    }
}
