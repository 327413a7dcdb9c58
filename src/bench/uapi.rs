//! The host's ioctl path: workloads that drive a VM's VFIO container through its typed
//! wrappers. Each call is encoded into its ioctl bytes, decoded and checked by the
//! container (ownership included), and carried out by the host VT-d driver, whose
//! invalidations go through the physical IOMMU's invalidation queue followed by an
//! invalidation wait; the driver polls the wait's status before the call returns.
//!
//! Each workload checks that its calls reached the physical IOMMU (descriptors processed,
//! PASID entries and second-level mappings present), so a figure never times a refusal.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vm_memory::{GuestAddress, GuestMemoryBackend};
use vsva_hw::PAGE_SIZE;
use vsva_uapi::iommu::IOMMU_CACHE_INV_TYPE_IOTLB;
use vsva_uapi::{BindGpasid, CacheInvalidate, DmaMap, InvGranularity};
use vsva_vtd::{Hpa, Iova, PageSize, Pasid};

use super::pasid::heap_in_use;
use super::vm::BenchVm;
use super::{BenchError, Workload};

/// Where the map workloads map their page: above guest RAM, within the second level.
pub const MAP_IOVA: u64 = 1 << 32;
/// Bound PASIDs the memory count spreads its bytes over.
pub const BOUND_PASIDS: u32 = 1024;

fn processed(vm: &BenchVm) -> u64 {
    vm.host().iommu.stats().descriptors.load(Ordering::Relaxed)
}

/// `VFIO_IOMMU_CACHE_INVALIDATE` of IOTLB entries of the bound PASID, as the vIOMMU
/// forwards a guest's PASID-based IOTLB invalidation: the host driver queues a PASID-based
/// IOTLB and a device-TLB descriptor and a wait. Back to back, the IOTLB holds none of the
/// PASID's translations after the first call.
pub struct HostInvalidations<'a> {
    vm: &'a BenchVm,
    inv: CacheInvalidate,
    /// Descriptors (wait included) the physical IOMMU processes per call.
    per_call: u64,
}

impl<'a> HostInvalidations<'a> {
    /// PASID-selective.
    pub fn pasid(vm: &'a BenchVm) -> Result<Self, BenchError> {
        Self::new(
            vm,
            InvGranularity::Pasid {
                pasid: Some(vm.pasid()),
                archid: None,
            },
        )
    }

    /// `pages` 4-KiB pages (a power of two): the naturally aligned block that holds the
    /// start of the process's buffer.
    pub fn pages(vm: &'a BenchVm, pages: u64) -> Result<Self, BenchError> {
        if !pages.is_power_of_two() {
            return Err(BenchError::Check(format!(
                "{pages} pages is not a power of two"
            )));
        }
        let block = pages * PAGE_SIZE;
        Self::new(
            vm,
            InvGranularity::Addr {
                pasid: Some(vm.pasid()),
                archid: None,
                addr: vm.buffer().0 & !(block - 1),
                granule_size: PAGE_SIZE,
                nb_granules: pages,
                leaf: false,
            },
        )
    }

    /// Makes one call and counts what it queued: at least a descriptor and its wait.
    fn new(vm: &'a BenchVm, granularity: InvGranularity) -> Result<Self, BenchError> {
        let inv = CacheInvalidate {
            cache: IOMMU_CACHE_INV_TYPE_IOTLB,
            granularity,
        };
        let before = processed(vm);
        vm.vm().vfio().cache_invalidate(&inv)?;
        let per_call = processed(vm) - before;
        if per_call < 2 {
            return Err(BenchError::Check(format!(
                "CACHE_INVALIDATE queued {per_call} descriptors, fewer than one and its wait"
            )));
        }
        Ok(HostInvalidations { vm, inv, per_call })
    }

    /// Descriptors the physical IOMMU processes per call, the wait included.
    pub fn descriptors_per_call(&self) -> u64 {
        self.per_call
    }
}

impl Workload for HostInvalidations<'_> {
    fn run(&mut self, iters: u64) -> Result<Duration, BenchError> {
        let before = processed(self.vm);
        let start = Instant::now();
        for _ in 0..iters {
            self.vm.vm().vfio().cache_invalidate(&self.inv)?;
        }
        let t = start.elapsed();
        let done = processed(self.vm) - before;
        if done != iters * self.per_call {
            return Err(BenchError::Check(format!(
                "{iters} invalidations processed {done} descriptors, not {} each",
                self.per_call
            )));
        }
        Ok(t)
    }
}

/// Which call of a bind and its unbind a [`HostBind`] times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BindCall {
    /// `VFIO_IOMMU_BIND`.
    Bind,
    /// `VFIO_IOMMU_UNBIND`.
    Unbind,
}

/// `VFIO_IOMMU_BIND` of a guest page table (the bound process's) to a PASID of the VM's
/// set, and `VFIO_IOMMU_UNBIND` of it, in turn: the driver writes the nested PASID entry,
/// flushes the PASID cache, IOTLB and device TLB for it, and routes its page requests;
/// the unbind clears the entry with the same flushes and drains the page requests. An
/// operation is a bind and an unbind; the workload times one of the two calls (each with
/// its own clock reads).
pub struct HostBind<'a> {
    vm: &'a BenchVm,
    bind: BindGpasid,
    timed: BindCall,
}

impl<'a> HostBind<'a> {
    /// Allocates the PASID (freed when the workload is dropped) and binds and unbinds it
    /// once, checking the host PASID entry comes and goes.
    pub fn new(vm: &'a BenchVm, timed: BindCall) -> Result<Self, BenchError> {
        let pasid = vm.vm().vfio().pasid_alloc(1, Pasid::MAX.raw())?;
        let w = HostBind {
            vm,
            bind: BindGpasid {
                hpasid: pasid,
                gpasid: Some(pasid),
                gpgd: vm.process().cr3(),
                addr_width: vm.process().paging_mode().input_width(),
                vtd_flags: 0,
                pat: 0,
                emt: 0,
            },
            timed,
        };
        let entry = || vm.host().unit.pasid_entry(vm.vm().host_sid, pasid);
        vm.vm().vfio().bind_gpasid(&w.bind)?;
        let bound = entry().is_some();
        vm.vm().vfio().unbind_gpasid(&w.bind)?;
        if !bound || entry().is_some() {
            return Err(BenchError::Check(format!(
                "binding {pasid} did not install, or unbinding did not remove, its host PASID entry"
            )));
        }
        Ok(w)
    }
}

impl Workload for HostBind<'_> {
    fn run(&mut self, iters: u64) -> Result<Duration, BenchError> {
        let mut timed = Duration::ZERO;
        for _ in 0..iters {
            let t0 = Instant::now();
            self.vm.vm().vfio().bind_gpasid(&self.bind)?;
            let t1 = Instant::now();
            self.vm.vm().vfio().unbind_gpasid(&self.bind)?;
            let t2 = Instant::now();
            timed += match self.timed {
                BindCall::Bind => t1 - t0,
                BindCall::Unbind => t2 - t1,
            };
        }
        Ok(timed)
    }
}

impl Drop for HostBind<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.vm.vm().vfio().pasid_free(self.bind.hpasid) {
            tracing::warn!("bench: freeing {}: {e}", self.bind.hpasid);
        }
    }
}

/// Which call of a map and its unmap a [`HostMap`] times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapCall {
    /// `VFIO_IOMMU_MAP_DMA`.
    Map,
    /// `VFIO_IOMMU_UNMAP_DMA`.
    Unmap,
}

/// `VFIO_IOMMU_MAP_DMA` of one 4-KiB page of the VMM's memory (the last page of guest RAM,
/// mapped a second time) at [`MAP_IOVA`], and `VFIO_IOMMU_UNMAP_DMA` of it, in turn: the
/// driver resolves the VMM address to host memory, writes the second-level entry and
/// invalidates the IOTLB for it; the unmap clears the entry and invalidates the IOTLB, the
/// device TLB for requests without PASID and the device TLB of each bound PASID. The
/// second level's tables for the IOVA stay after the first map. An operation is a map and
/// an unmap; the workload times one of the two calls.
pub struct HostMap<'a> {
    vm: &'a BenchVm,
    map: DmaMap,
    timed: MapCall,
}

impl<'a> HostMap<'a> {
    /// Maps and unmaps once, checking the second level maps the page to the guest RAM
    /// frame, then not at all.
    pub fn new(vm: &'a BenchVm, timed: MapCall) -> Result<Self, BenchError> {
        let gpa = vm.vm().ram_size - PAGE_SIZE;
        let vaddr = vm
            .vm()
            .mem
            .get_host_address(GuestAddress(gpa))
            .map_err(|e| BenchError::Check(format!("guest RAM at {gpa:#x}: {e}")))?
            as u64;
        let w = HostMap {
            vm,
            map: DmaMap {
                iova: Iova(MAP_IOVA),
                vaddr,
                size: PAGE_SIZE,
                read: true,
                write: true,
            },
            timed,
        };
        let lookup = || vm.vm().vfio().backend().lookup(Iova(MAP_IOVA));
        vm.vm().vfio().map_dma(&w.map)?;
        let mapped = lookup();
        let unmapped = vm.vm().vfio().unmap_dma(Iova(MAP_IOVA), PAGE_SIZE)?;
        let want = Some((Hpa(vm.vm().ram_hpa.0 + gpa), PageSize::Size4K));
        if mapped != want || unmapped != PAGE_SIZE || lookup().is_some() {
            return Err(BenchError::Check(format!(
                "MAP_DMA at {MAP_IOVA:#x} mapped {mapped:?} (expected {want:?}), UNMAP_DMA unmapped {unmapped} bytes"
            )));
        }
        Ok(w)
    }
}

impl Workload for HostMap<'_> {
    fn run(&mut self, iters: u64) -> Result<Duration, BenchError> {
        let mut timed = Duration::ZERO;
        let mut unmapped = 0;
        for _ in 0..iters {
            let t0 = Instant::now();
            self.vm.vm().vfio().map_dma(&self.map)?;
            let t1 = Instant::now();
            unmapped += self.vm.vm().vfio().unmap_dma(self.map.iova, PAGE_SIZE)?;
            let t2 = Instant::now();
            timed += match self.timed {
                MapCall::Map => t1 - t0,
                MapCall::Unmap => t2 - t1,
            };
        }
        if unmapped != iters * PAGE_SIZE {
            return Err(BenchError::Check(format!(
                "{iters} unmaps of a 4-KiB page unmapped {unmapped} bytes"
            )));
        }
        Ok(timed)
    }
}

/// What binding PASIDs costs in memory: host heap (container, driver, PASID allocator)
/// and host frames (the PASID tables the entries are written into, allocated on first use
/// and kept, as Linux keeps them, until the device is detached).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BoundPasidMemory {
    /// PASIDs allocated and bound.
    pub pasids: u32,
    /// Heap bytes taken (glibc's `mallinfo2`).
    pub heap: u64,
    /// Host frame bytes taken.
    pub tables: u64,
}

impl BoundPasidMemory {
    /// Bytes per bound PASID.
    pub fn per_pasid(&self) -> f64 {
        (self.heap + self.tables) as f64 / f64::from(self.pasids)
    }
}

/// `n` PASIDs of the VM's set, each allocated and bound (`PASID_REQUEST` then
/// `VFIO_IOMMU_BIND`) to the bound process's page table, with the heap and host frames
/// that took; freed (and so unbound) when dropped. The PASID tables stay with the device.
pub struct BoundPasids<'a> {
    vm: &'a BenchVm,
    pasids: Vec<Pasid>,
    memory: Option<BoundPasidMemory>,
}

impl<'a> BoundPasids<'a> {
    /// Binds the PASIDs and checks each has its host PASID entry. On a new VM the frames
    /// counted include the PASID tables. The heap count is exact only while no other
    /// thread allocates.
    pub fn new(vm: &'a BenchVm, n: u32) -> Result<Self, BenchError> {
        let mut bound = BoundPasids {
            vm,
            pasids: Vec::with_capacity(n as usize),
            memory: None,
        };
        let frames = &vm.host().frames;
        let (heap, tables) = (heap_in_use(), frames.allocated_bytes());
        {
            let mut vfio = vm.vm().vfio();
            for _ in 0..n {
                let pasid = vfio.pasid_alloc(1, Pasid::MAX.raw())?;
                bound.pasids.push(pasid);
                vfio.bind_gpasid(&BindGpasid {
                    hpasid: pasid,
                    gpasid: Some(pasid),
                    gpgd: vm.process().cr3(),
                    addr_width: vm.process().paging_mode().input_width(),
                    vtd_flags: 0,
                    pat: 0,
                    emt: 0,
                })?;
            }
        }
        let (heap_after, tables_after) = (heap_in_use(), frames.allocated_bytes());
        bound.memory = heap.zip(heap_after).map(|(h0, h1)| BoundPasidMemory {
            pasids: n,
            heap: h1.saturating_sub(h0),
            tables: tables_after.saturating_sub(tables),
        });
        let entries = bound
            .pasids
            .iter()
            .filter(|&&p| vm.host().unit.pasid_entry(vm.vm().host_sid, p).is_some())
            .count();
        if entries != n as usize {
            return Err(BenchError::Check(format!(
                "{entries} of {n} bound PASIDs have a host PASID entry"
            )));
        }
        Ok(bound)
    }

    /// What the binds took; `None` without allocator statistics.
    pub fn memory(&self) -> Option<BoundPasidMemory> {
        self.memory
    }
}

impl Drop for BoundPasids<'_> {
    fn drop(&mut self) {
        let mut vfio = self.vm.vm().vfio();
        for &pasid in &self.pasids {
            if let Err(e) = vfio.pasid_free(pasid) {
                tracing::warn!("bench: freeing {pasid}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalidations_queue_a_descriptor_and_its_wait_and_ranges_one_descriptor() {
        let vm = BenchVm::new().unwrap();
        let pasid = HostInvalidations::pasid(&vm)
            .unwrap()
            .descriptors_per_call();
        let one = HostInvalidations::pages(&vm, 1)
            .unwrap()
            .descriptors_per_call();
        let many = HostInvalidations::pages(&vm, 512).unwrap();
        // A PASID-based IOTLB and a device-TLB descriptor, and the wait: a range is one
        // descriptor whatever its size.
        assert_eq!((pasid, one, many.descriptors_per_call()), (3, 3, 3));
        assert!(HostInvalidations::pages(&vm, 3).is_err());
        let mut many = many;
        many.run(5).unwrap();
    }

    #[test]
    fn bind_and_map_pairs_leave_nothing_behind() {
        let vm = BenchVm::new().unwrap();
        let before = vm.vm().vfio().state();
        {
            let mut bind = HostBind::new(&vm, BindCall::Unbind).unwrap();
            bind.run(3).unwrap();
            let mut map = HostMap::new(&vm, MapCall::Map).unwrap();
            map.run(3).unwrap();
        }
        assert_eq!(vm.vm().vfio().state(), before);
    }

    #[test]
    fn bound_pasids_count_the_pasid_tables_and_are_freed() {
        let vm = BenchVm::new().unwrap();
        let before = vm.vm().vfio().state();
        let m = BoundPasids::new(&vm, 128).unwrap().memory().unwrap();
        assert_eq!(m.pasids, 128);
        // 64 entries of 64 bytes per PASID table page: two new pages at least.
        assert!(m.tables >= 2 * PAGE_SIZE, "{m:?}");
        assert_eq!(vm.vm().vfio().state(), before);
        // The tables stay for the device (as Linux keeps them until it is detached), and
        // the same PASIDs bound again take none.
        let again = BoundPasids::new(&vm, 128).unwrap().memory().unwrap();
        assert_eq!(again.tables, 0);
    }
}
