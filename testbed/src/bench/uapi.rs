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

use std::sync::Arc;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use vsva_guest::{process::Process, process::Prot};
use vsva_hw::iommu::{DmaMapping, Source};
use vsva_hw::memory::PAGE_SIZE;
use vsva_uapi::file::VfioIoctls;
use vsva_uapi::iommu::IOMMU_CACHE_INV_TYPE_IOTLB;
use vsva_uapi::{
    request::BindGpasid, request::CacheInvalidate, request::DmaMap, request::InvGranularity,
};
use vsva_vtd::{
    addr::Gva, addr::Hpa, addr::Iova, addr::Pasid, flpte::FlPagingMode, walk::AccessRequest,
    walk::PageSize,
};

use super::pasid::heap_in_use;
use super::translate::timer_overhead;
use super::vm::BenchVm;
use super::{BenchError, Workload};
use crate::stack::GUEST_DEVICE_SID;

/// Where the map workloads map their page: above guest RAM, within the second level.
pub const MAP_IOVA: u64 = 1 << 32;
/// Bound PASIDs the memory count spreads its bytes over.
pub const BOUND_PASIDS: u32 = 1024;

fn processed(vm: &BenchVm) -> u64 {
    vm.host().iommu.stats().descriptors.load(Ordering::Relaxed)
}

/// Where [`CachedTranslations`] maps its pages in the bound process: a 2-MiB aligned
/// address above everything the process maps otherwise.
pub const CACHED_GVA: u64 = 0x10_0000_0000;
/// Pages of the 2-MiB block the 512-page invalidation removes.
const BLOCK_PAGES: u64 = 512;
/// Pages of a second bound process that every invalidation must leave cached: the
/// translations of another address space of the VM.
pub const OTHER_PAGES: u64 = 1024;

/// The translations the invalidation workloads keep in the host IOMMU's IOTLB and
/// paging-structure caches: two 2-MiB blocks of the bound process, resident (the first is
/// the one the 512-page invalidation removes, the second lies beside it), and
/// [`OTHER_PAGES`] pages of a second process bound to the same device. Each page's host
/// address, from its first translation, is what every later translation must give.
pub struct CachedTranslations<'a> {
    vm: &'a BenchVm,
    /// The bound process's pages: (GVA, HPA).
    block: Vec<(u64, u64)>,
    beside: Vec<(u64, u64)>,
    /// The second process, its PASID and its pages.
    other: Arc<Process>,
    other_pasid: Pasid,
    others: Vec<(u64, u64)>,
}

impl<'a> CachedTranslations<'a> {
    /// Maps the two blocks in the bound process, binds a second process with its own
    /// pages, and translates every page once.
    pub fn new(vm: &'a BenchVm) -> Result<Self, BenchError> {
        let other = vm.vm().spawn(FlPagingMode::FourLevel)?;
        let others_gva = other.mmap(OTHER_PAGES * PAGE_SIZE, Prot::READ_WRITE)?;
        let other_pasid = vm.vm().bind(&other)?;
        let mut cached = CachedTranslations {
            vm,
            block: Vec::new(),
            beside: Vec::new(),
            other,
            other_pasid,
            others: Vec::new(),
        };
        vm.process().mmap_fixed(
            Gva(CACHED_GVA),
            2 * BLOCK_PAGES * PAGE_SIZE,
            Prot::READ_WRITE,
            true,
        )?;
        let pages = |first: u64, n: u64| (0..n).map(move |i| first + i * PAGE_SIZE);
        let pasid = Some(vm.pasid());
        for gva in pages(CACHED_GVA, BLOCK_PAGES) {
            cached.block.push((gva, cached.translate(pasid, gva)?.hpa));
        }
        for gva in pages(CACHED_GVA + BLOCK_PAGES * PAGE_SIZE, BLOCK_PAGES) {
            cached.beside.push((gva, cached.translate(pasid, gva)?.hpa));
        }
        for gva in pages(others_gva.0, OTHER_PAGES) {
            let hpa = cached.translate(Some(other_pasid), gva)?.hpa;
            cached.others.push((gva, hpa));
        }
        Ok(cached)
    }

    fn translate(&self, pasid: Option<Pasid>, addr: u64) -> Result<DmaMapping, BenchError> {
        let host = self.vm.host();
        Ok(host
            .iommu
            .translate(self.vm.vm().host_sid, pasid, addr, AccessRequest::READ)?)
    }

    /// Translates each page of `pages` with `pasid`, checks its host address and that it
    /// came from `source`.
    fn expect(&self, pasid: Pasid, pages: &[(u64, u64)], source: Source) -> Result<(), BenchError> {
        for &(addr, hpa) in pages {
            let m = self.translate(Some(pasid), addr)?;
            if m.source != source || m.hpa != hpa {
                return Err(BenchError::Check(format!(
                    "{addr:#x} of {pasid} translated to {:#x} from {:?}, expected {hpa:#x} \
                     from {source:?}",
                    m.hpa, m.source
                )));
            }
        }
        Ok(())
    }
}

impl Drop for CachedTranslations<'_> {
    /// Unmaps the blocks and the second process's pages, and unbinds it.
    fn drop(&mut self) {
        let process = self.vm.process();
        if let Err(e) = process.munmap(Gva(CACHED_GVA), 2 * BLOCK_PAGES * PAGE_SIZE) {
            tracing::warn!("bench: unmapping the cached-translation blocks: {e}");
        }
        if let Some(&(first, _)) = self.others.first() {
            if let Err(e) = self.other.munmap(Gva(first), OTHER_PAGES * PAGE_SIZE) {
                tracing::warn!("bench: unmapping the second process's pages: {e}");
            }
        }
        let driver = &self.vm.vm().driver;
        if let Err(e) = driver.sva_unbind(GUEST_DEVICE_SID, self.other_pasid) {
            tracing::warn!("bench: unbinding {}: {e}", self.other_pasid);
        }
    }
}

/// `VFIO_IOMMU_CACHE_INVALIDATE` of IOTLB entries of the bound PASID, as the vIOMMU
/// forwards a guest's PASID-based IOTLB invalidation: the host driver queues a PASID-based
/// IOTLB and a device-TLB descriptor and a wait.
///
/// Each call meets caches that hold what it must remove and others besides
/// ([`CachedTranslations`]): it is timed alone (the clock's own cost taken off), and then,
/// untimed, every page it had to remove must walk again (which puts it back, to the same
/// host address), every other page must still hit the IOTLB, and the first-level
/// paging-structure caches must have lost entries while the second-level ones (tagged by
/// domain, shared by both PASIDs' nested walks) keep theirs.
pub struct HostInvalidations<'a> {
    cached: &'a CachedTranslations<'a>,
    inv: CacheInvalidate,
    /// The bound PASID's pages the call removes, and those it keeps.
    removed: Vec<(u64, u64)>,
    kept: Vec<(u64, u64)>,
    /// Descriptors (wait included) the physical IOMMU processes per call.
    per_call: u64,
    overhead: Duration,
}

impl<'a> HostInvalidations<'a> {
    /// PASID-selective: removes every cached page of the PASID; the block is checked
    /// (the block beside it goes too, and is not put back).
    pub fn pasid(cached: &'a CachedTranslations<'a>) -> Result<Self, BenchError> {
        Self::new(
            cached,
            InvGranularity::Pasid {
                pasid: Some(cached.vm.pasid()),
                archid: None,
            },
            cached.block.clone(),
            Vec::new(),
        )
    }

    /// `pages` 4-KiB pages (a power of two, at most 512) from the start of the block: they
    /// are removed, the rest of the block and the block beside it are kept.
    pub fn pages(cached: &'a CachedTranslations<'a>, pages: u64) -> Result<Self, BenchError> {
        if !pages.is_power_of_two() || pages > BLOCK_PAGES {
            return Err(BenchError::Check(format!(
                "{pages} pages is not a power of two up to {BLOCK_PAGES}"
            )));
        }
        let (removed, rest) = cached.block.split_at(pages as usize);
        Self::new(
            cached,
            InvGranularity::Addr {
                pasid: Some(cached.vm.pasid()),
                archid: None,
                addr: CACHED_GVA,
                granule_size: PAGE_SIZE,
                nb_granules: pages,
                leaf: false,
            },
            removed.to_vec(),
            rest.iter().chain(&cached.beside).copied().collect(),
        )
    }

    /// Makes one call and counts what it queued: at least a descriptor and its wait.
    fn new(
        cached: &'a CachedTranslations<'a>,
        granularity: InvGranularity,
        removed: Vec<(u64, u64)>,
        kept: Vec<(u64, u64)>,
    ) -> Result<Self, BenchError> {
        let inv = CacheInvalidate {
            cache: IOMMU_CACHE_INV_TYPE_IOTLB,
            granularity,
        };
        let vm = cached.vm;
        let before = processed(vm);
        vm.vm().vfio()?.cache_invalidate(&inv)?;
        let per_call = processed(vm) - before;
        if per_call < 2 {
            return Err(BenchError::Check(format!(
                "CACHE_INVALIDATE queued {per_call} descriptors, fewer than one and its wait"
            )));
        }
        Ok(HostInvalidations {
            cached,
            inv,
            removed,
            kept,
            per_call,
            overhead: timer_overhead(),
        })
    }

    /// Descriptors the physical IOMMU processes per call, the wait included.
    pub fn descriptors_per_call(&self) -> u64 {
        self.per_call
    }

    /// Pages of the bound PASID each call must remove.
    pub fn removes(&self) -> usize {
        self.removed.len()
    }

    /// Puts every page the workload checks in the IOTLB (walking where it is not).
    fn populate(&self) -> Result<(), BenchError> {
        let c = self.cached;
        for &(addr, _) in self.removed.iter().chain(&self.kept) {
            c.translate(Some(c.vm.pasid()), addr)?;
        }
        for &(addr, _) in &c.others {
            c.translate(Some(c.other_pasid), addr)?;
        }
        Ok(())
    }
}

impl Workload for HostInvalidations<'_> {
    fn run(&mut self, iters: u64) -> Result<Duration, BenchError> {
        let c = self.cached;
        let vm = c.vm;
        let caches = vm.host().iommu.paging_structure_caches();
        let pasid = vm.pasid();
        self.populate()?;
        let before = processed(vm);
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            let held = caches.len();
            let start = Instant::now();
            vm.vm().vfio()?.cache_invalidate(&self.inv)?;
            total += start.elapsed().saturating_sub(self.overhead);
            let left = caches.len();
            if left.first_level >= held.first_level || left.second_level < held.second_level {
                return Err(BenchError::Check(format!(
                    "{:?} left the paging-structure caches at {left:?} from {held:?}: \
                     first-level entries must go, second-level ones stay",
                    self.inv.granularity
                )));
            }
            c.expect(c.other_pasid, &c.others, Source::Iotlb)?;
            c.expect(pasid, &self.kept, Source::Iotlb)?;
            c.expect(pasid, &self.removed, Source::Walk)?;
        }
        let done = processed(vm) - before;
        if done != iters * self.per_call {
            return Err(BenchError::Check(format!(
                "{iters} invalidations processed {done} descriptors, not {} each",
                self.per_call
            )));
        }
        Ok(total)
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
        let pasid = vm.vm().vfio()?.pasid_alloc(1, Pasid::MAX.raw())?;
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
        vm.vm().vfio()?.bind_gpasid(&w.bind)?;
        let bound = entry().is_some();
        vm.vm().vfio()?.unbind_gpasid(&w.bind)?;
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
            self.vm.vm().vfio()?.bind_gpasid(&self.bind)?;
            let t1 = Instant::now();
            self.vm.vm().vfio()?.unbind_gpasid(&self.bind)?;
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
        let freed = self
            .vm
            .vm()
            .vfio()
            .map_err(BenchError::from)
            .and_then(|mut vfio| Ok(vfio.pasid_free(self.bind.hpasid)?));
        if let Err(e) = freed {
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
        let lookup =
            || -> Result<_, BenchError> { Ok(vm.vm().vfio()?.backend().lookup(Iova(MAP_IOVA))) };
        vm.vm().vfio()?.map_dma(&w.map)?;
        let mapped = lookup()?;
        let unmapped = vm.vm().vfio()?.unmap_dma(Iova(MAP_IOVA), PAGE_SIZE)?;
        let want = Some((Hpa(vm.vm().ram_hpa.0 + gpa), PageSize::Size4K));
        if mapped != want || unmapped != PAGE_SIZE || lookup()?.is_some() {
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
            self.vm.vm().vfio()?.map_dma(&self.map)?;
            let t1 = Instant::now();
            unmapped += self.vm.vm().vfio()?.unmap_dma(self.map.iova, PAGE_SIZE)?;
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
    /// thread allocates; the binds run on a thread of their own, whose allocator cache
    /// starts empty (glibc counts chunks freed into a thread's cache as still in use, so
    /// binds served from the caller's cache would not show).
    pub fn new(vm: &'a BenchVm, n: u32) -> Result<Self, BenchError> {
        let mut bound = BoundPasids {
            vm,
            pasids: Vec::with_capacity(n as usize),
            memory: None,
        };
        let pasids = &mut bound.pasids;
        let counted = std::thread::scope(|scope| {
            let binder = scope.spawn(|| Self::bind(vm, n, pasids));
            binder
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        });
        // Whatever was bound is freed when `bound` drops, also on an error.
        bound.memory = counted?;
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

    /// Allocates and binds `n` PASIDs into `pasids`; what that took, read around the loop.
    fn bind(
        vm: &BenchVm,
        n: u32,
        pasids: &mut Vec<Pasid>,
    ) -> Result<Option<BoundPasidMemory>, BenchError> {
        let frames = &vm.host().frames;
        let (heap, tables) = (heap_in_use(), frames.allocated_bytes());
        {
            let mut vfio = vm.vm().vfio()?;
            for _ in 0..n {
                let pasid = vfio.pasid_alloc(1, Pasid::MAX.raw())?;
                pasids.push(pasid);
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
        Ok(heap.zip(heap_after).map(|(h0, h1)| BoundPasidMemory {
            pasids: n,
            heap: h1.saturating_sub(h0),
            tables: tables_after.saturating_sub(tables),
        }))
    }

    /// What the binds took; `None` without allocator statistics.
    pub fn memory(&self) -> Option<BoundPasidMemory> {
        self.memory
    }
}

impl Drop for BoundPasids<'_> {
    fn drop(&mut self) {
        // `new` bound them through the container, so the VM has one.
        let Ok(mut vfio) = self.vm.vm().vfio() else {
            return;
        };
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
        let cached = CachedTranslations::new(&vm).unwrap();
        let pasid = HostInvalidations::pasid(&cached).unwrap();
        let one = HostInvalidations::pages(&cached, 1).unwrap();
        let many = HostInvalidations::pages(&cached, 512).unwrap();
        // A PASID-based IOTLB and a device-TLB descriptor, and the wait: a range is one
        // descriptor whatever its size.
        let per_call = [&pasid, &one, &many].map(|w| w.descriptors_per_call());
        assert_eq!(per_call, [3, 3, 3]);
        assert_eq!([&pasid, &one, &many].map(|w| w.removes()), [512, 1, 512]);
        assert!(HostInvalidations::pages(&cached, 3).is_err());
        assert!(HostInvalidations::pages(&cached, 1024).is_err());
    }

    #[test]
    fn invalidations_meet_populated_caches_and_remove_only_their_entries() {
        let vm = BenchVm::new().unwrap();
        let cached = CachedTranslations::new(&vm).unwrap();
        let iommu = &vm.host().iommu;
        let walks = || iommu.stats().walks.load(Ordering::Relaxed);
        for (mut w, removed) in [
            (HostInvalidations::pasid(&cached).unwrap(), 512),
            (HostInvalidations::pages(&cached, 512).unwrap(), 512),
            (HostInvalidations::pages(&cached, 1).unwrap(), 1),
        ] {
            w.populate().unwrap();
            let before = walks();
            w.run(3).unwrap();
            // Each call's removed pages walk again, and nothing else does.
            assert_eq!(walks() - before, 3 * removed);
            assert!(iommu.iotlb().len() as u64 >= removed + OTHER_PAGES);
        }
    }

    #[test]
    fn an_invalidation_that_removes_too_little_or_too_much_fails_its_check() {
        let vm = BenchVm::new().unwrap();
        let cached = CachedTranslations::new(&vm).unwrap();
        // Claims the 1-page call removes two pages: the second is still cached.
        let mut w = HostInvalidations::pages(&cached, 1).unwrap();
        w.removed.push(w.kept.remove(0));
        let e = w.run(1).unwrap_err().to_string();
        assert!(
            e.contains("from Iotlb, expected") && e.contains("from Walk"),
            "{e}"
        );
        // Claims the 512-page call keeps a page of its block.
        let mut w = HostInvalidations::pages(&cached, 512).unwrap();
        w.kept.push(w.removed[7]);
        let e = w.run(1).unwrap_err().to_string();
        assert!(
            e.contains("from Walk, expected") && e.contains("from Iotlb"),
            "{e}"
        );
    }

    #[test]
    fn bind_and_map_pairs_leave_nothing_behind() {
        let vm = BenchVm::new().unwrap();
        let before = vm.vm().vfio().unwrap().state();
        {
            let mut bind = HostBind::new(&vm, BindCall::Unbind).unwrap();
            bind.run(3).unwrap();
            let mut map = HostMap::new(&vm, MapCall::Map).unwrap();
            map.run(3).unwrap();
        }
        assert_eq!(vm.vm().vfio().unwrap().state(), before);
    }

    #[test]
    fn bound_pasids_count_the_pasid_tables_and_are_freed() {
        let vm = BenchVm::new().unwrap();
        let before = vm.vm().vfio().unwrap().state();
        let m = BoundPasids::new(&vm, 128).unwrap().memory().unwrap();
        assert_eq!(m.pasids, 128);
        // 64 entries of 64 bytes per PASID table page: two new pages at least.
        assert!(m.tables >= 2 * PAGE_SIZE, "{m:?}");
        assert_eq!(vm.vm().vfio().unwrap().state(), before);
        // The tables stay for the device (as Linux keeps them until it is detached), and
        // the same PASIDs bound again take none.
        let again = BoundPasids::new(&vm, 128).unwrap().memory().unwrap();
        assert_eq!(again.tables, 0);
    }
}
