//! The forwarded path: workloads a guest drives through its own IOMMU driver, whose
//! descriptors and waits the vIOMMU carries out and forwards to the host as VFIO calls,
//! down to the physical IOMMU and the device.
//!
//! - [`ForwardedInvalidation`]: a process changes one page's rights; the guest driver's
//!   mmu notifier writes a PASID-based IOTLB descriptor and a wait into the vIOMMU's
//!   queue in guest RAM and moves the tail register (MMIO), the vIOMMU forwards it as
//!   `VFIO_IOMMU_CACHE_INVALIDATE`, the host driver queues it to the physical IOMMU and
//!   waits, the vIOMMU writes the guest's wait status, and the guest driver sees it; then
//!   the same for the device-TLB descriptor.
//! - [`GuestBind`]: the guest's SVA bind: a PASID from the virtual command interface
//!   (`PASID_REQUEST` on the host), the first-level PASID entry, and the PASID-cache,
//!   IOTLB and device-TLB flushes, each with its wait; the vIOMMU shadows the entry to a
//!   host `VFIO_IOMMU_BIND` on the PASID-cache flush and forwards the others.
//! - [`PageRequestRoundTrip`]: the device writes a page the process has not touched: it
//!   faults, sends a page request, which goes from the physical IOMMU to the host driver,
//!   the VFIO fault queue, the vIOMMU's page request queue and the guest's handler, which
//!   maps the page and answers; the response goes down the same way and the device
//!   retries.
//!
//! Each workload checks, with the layers' counters, that every operation took the whole
//! path and that no host call failed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vsva_guest::{iommu::DriverStats, process::Process, process::Prot};
use vsva_hw::memory::PAGE_SIZE;
use vsva_vmm::VIommuStats;
use vsva_vtd::{addr::Gva, flpte::FlPagingMode};

use super::vm::BenchVm;
use super::{BenchError, Workload};
use crate::stack::GUEST_DEVICE_SID;

/// What the guest driver and the vIOMMU counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Counts {
    guest: DriverStats,
    viommu: VIommuStats,
}

impl Counts {
    fn of(vm: &BenchVm) -> Self {
        Counts {
            guest: vm.vm().driver.stats(),
            viommu: vm.vm().viommu.stats(),
        }
    }
}

/// Fails when the vIOMMU's host calls failed between `before` and `after`.
fn no_host_errors(before: &Counts, after: &Counts) -> Result<(), BenchError> {
    let errors = after.viommu.host_errors - before.viommu.host_errors;
    if errors != 0 {
        return Err(BenchError::Check(format!(
            "{errors} of the vIOMMU's host calls failed"
        )));
    }
    Ok(())
}

/// `mprotect` of one resident page of the bound process, rights unchanged: the guest
/// driver's mmu notifier invalidates the page in the PASID's IOTLB and, the device having
/// ATS, in its device TLB, each a descriptor and a wait forwarded to the host. An
/// operation is one `mprotect`, page-table update included.
pub struct ForwardedInvalidation<'a> {
    vm: &'a BenchVm,
    page: Gva,
    /// Guest waits (each after one descriptor) per operation.
    waits: u64,
}

impl<'a> ForwardedInvalidation<'a> {
    /// Runs one operation and counts its waits; each must have carried one forwarded
    /// invalidation.
    pub fn new(vm: &'a BenchVm) -> Result<Self, BenchError> {
        let page = vm.buffer();
        let before = Counts::of(vm);
        vm.process().mprotect(page, PAGE_SIZE, Prot::READ_WRITE)?;
        let after = Counts::of(vm);
        no_host_errors(&before, &after)?;
        let waits = after.guest.waits - before.guest.waits;
        let forwarded =
            after.viommu.invalidations_forwarded - before.viommu.invalidations_forwarded;
        if waits == 0 || forwarded != waits {
            return Err(BenchError::Check(format!(
                "an mmu-notifier invalidation submitted {waits} waits and was forwarded as {forwarded} host invalidations"
            )));
        }
        Ok(ForwardedInvalidation { vm, page, waits })
    }

    /// Descriptors, each with its wait, that one operation forwards.
    pub fn waits_per_op(&self) -> u64 {
        self.waits
    }
}

impl Workload for ForwardedInvalidation<'_> {
    fn run(&mut self, iters: u64) -> Result<Duration, BenchError> {
        let process = self.vm.process();
        let before = Counts::of(self.vm);
        let start = Instant::now();
        for _ in 0..iters {
            process.mprotect(self.page, PAGE_SIZE, Prot::READ_WRITE)?;
        }
        let t = start.elapsed();
        let after = Counts::of(self.vm);
        no_host_errors(&before, &after)?;
        let forwarded =
            after.viommu.invalidations_forwarded - before.viommu.invalidations_forwarded;
        if forwarded != iters * self.waits {
            return Err(BenchError::Check(format!(
                "{iters} mmu-notifier invalidations were forwarded as {forwarded} host invalidations, not {} each",
                self.waits
            )));
        }
        Ok(t)
    }
}

/// The baseline of [`ForwardedInvalidation`]: the same `mprotect` in a process bound to
/// no device, so no notifier: the process's own share.
pub struct UnboundMprotect {
    process: Arc<Process>,
    page: Gva,
}

impl UnboundMprotect {
    /// A new process of the VM with one resident page.
    pub fn new(vm: &BenchVm) -> Result<Self, BenchError> {
        let process = vm.vm().spawn(FlPagingMode::FourLevel)?;
        let page = process.mmap(PAGE_SIZE, Prot::READ_WRITE)?;
        Ok(UnboundMprotect { process, page })
    }
}

impl Workload for UnboundMprotect {
    fn run(&mut self, iters: u64) -> Result<Duration, BenchError> {
        let start = Instant::now();
        for _ in 0..iters {
            self.process
                .mprotect(self.page, PAGE_SIZE, Prot::READ_WRITE)?;
        }
        Ok(start.elapsed())
    }
}

/// Which call of a guest bind and its unbind a [`GuestBind`] times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestCall {
    /// The guest's `sva_bind`.
    Bind,
    /// The guest's `sva_unbind`.
    Unbind,
}

/// The guest binds a process with no mappings to the passthrough device and unbinds it,
/// in turn (`sva_bind`, `sva_unbind`): each shadowed to a host bind or unbind. The
/// unbind also drains the PASID's page requests and frees the PASID through the virtual
/// command interface. An operation is a bind and an unbind; the workload times one of the
/// two calls.
pub struct GuestBind<'a> {
    vm: &'a BenchVm,
    process: Arc<Process>,
    timed: GuestCall,
}

impl<'a> GuestBind<'a> {
    /// A new process of the VM, not bound yet.
    pub fn new(vm: &'a BenchVm, timed: GuestCall) -> Result<Self, BenchError> {
        let process = vm.vm().spawn(FlPagingMode::FourLevel)?;
        Ok(GuestBind { vm, process, timed })
    }
}

impl Workload for GuestBind<'_> {
    fn run(&mut self, iters: u64) -> Result<Duration, BenchError> {
        let vm = self.vm.vm();
        let before = Counts::of(self.vm);
        let mut timed = Duration::ZERO;
        for _ in 0..iters {
            let t0 = Instant::now();
            let pasid = vm.bind(&self.process)?;
            let t1 = Instant::now();
            vm.driver.sva_unbind(GUEST_DEVICE_SID, pasid)?;
            let t2 = Instant::now();
            timed += match self.timed {
                GuestCall::Bind => t1 - t0,
                GuestCall::Unbind => t2 - t1,
            };
        }
        let after = Counts::of(self.vm);
        no_host_errors(&before, &after)?;
        let (binds, unbinds) = (
            after.viommu.binds - before.viommu.binds,
            after.viommu.unbinds - before.viommu.unbinds,
        );
        if (binds, unbinds) != (iters, iters) {
            return Err(BenchError::Check(format!(
                "{iters} guest binds and unbinds were shadowed as {binds} host binds and {unbinds} unbinds"
            )));
        }
        Ok(timed)
    }
}

/// The device fills one page of the bound process that is reserved but not mapped: one
/// page request goes up to the guest and its response down, and the device's retry
/// succeeds. An operation is the whole descriptor as [`crate::stack::Vmm::run`] runs it:
/// the process clears its completion record, the descriptor goes to the device's portal,
/// the device faults, the request and response make their round trip, the device fills
/// the page and writes the record, and the process reads it. Between operations, not
/// timed, the process unmaps the page (invalidating it all the way down) and reserves it
/// again.
pub struct PageRequestRoundTrip<'a> {
    vm: &'a BenchVm,
    page: Gva,
}

impl<'a> PageRequestRoundTrip<'a> {
    /// Reserves the page.
    pub fn new(vm: &'a BenchVm) -> Result<Self, BenchError> {
        let page = vm.process().mmap_lazy(PAGE_SIZE, Prot::READ_WRITE)?;
        Ok(PageRequestRoundTrip { vm, page })
    }
}

impl Workload for PageRequestRoundTrip<'_> {
    fn run(&mut self, iters: u64) -> Result<Duration, BenchError> {
        let process = self.vm.process();
        let requests = |vm: &BenchVm| vm.vm().engine.stats().page_requests;
        let (before, requests_before) = (Counts::of(self.vm), requests(self.vm));
        let mut timed = Duration::ZERO;
        for _ in 0..iters {
            let t0 = Instant::now();
            self.vm.fill(self.page, PAGE_SIZE)?;
            timed += t0.elapsed();
            process.munmap(self.page, PAGE_SIZE)?;
            process.mmap_fixed(self.page, PAGE_SIZE, Prot::READ_WRITE, false)?;
        }
        let after = Counts::of(self.vm);
        no_host_errors(&before, &after)?;
        let sent = requests(self.vm) - requests_before;
        let served = after.guest.page_requests_served - before.guest.page_requests_served;
        if (sent, served) != (iters, iters) {
            return Err(BenchError::Check(format!(
                "{iters} fills of an unmapped page sent {sent} page requests, {served} served by the guest"
            )));
        }
        Ok(timed)
    }
}

/// The baseline of [`PageRequestRoundTrip`]: the same fill of a resident page whose
/// translation the device TLB holds, so no page request.
pub struct ResidentFill<'a> {
    vm: &'a BenchVm,
}

impl<'a> ResidentFill<'a> {
    /// The workload on the bench VM `vm`.
    pub fn new(vm: &'a BenchVm) -> Self {
        ResidentFill { vm }
    }
}

impl Workload for ResidentFill<'_> {
    fn run(&mut self, iters: u64) -> Result<Duration, BenchError> {
        let requests = |vm: &BenchVm| vm.vm().engine.stats().page_requests;
        let before = requests(self.vm);
        let page = Gva(self.vm.buffer().0 + PAGE_SIZE);
        let start = Instant::now();
        for _ in 0..iters {
            self.vm.fill(page, PAGE_SIZE)?;
        }
        let t = start.elapsed();
        let sent = requests(self.vm) - before;
        if sent != 0 {
            return Err(BenchError::Check(format!(
                "fills of a resident page sent {sent} page requests"
            )));
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_mmu_notifier_invalidation_forwards_the_iotlb_and_the_device_tlb_descriptor() {
        let vm = BenchVm::new().unwrap();
        let mut w = ForwardedInvalidation::new(&vm).unwrap();
        assert_eq!(w.waits_per_op(), 2);
        w.run(3).unwrap();
        UnboundMprotect::new(&vm).unwrap().run(3).unwrap();
    }

    #[test]
    fn guest_binds_are_shadowed_and_undone() {
        let vm = BenchVm::new().unwrap();
        let bound = vm.vm().driver.bound_pasids();
        let host = vm.vm().vfio().unwrap().state();
        GuestBind::new(&vm, GuestCall::Bind)
            .unwrap()
            .run(3)
            .unwrap();
        GuestBind::new(&vm, GuestCall::Unbind)
            .unwrap()
            .run(2)
            .unwrap();
        assert_eq!(vm.vm().driver.bound_pasids(), bound);
        assert_eq!(vm.vm().vfio().unwrap().state(), host);
    }

    #[test]
    fn each_fill_of_a_fresh_page_makes_one_page_request_round_trip() {
        let vm = BenchVm::new().unwrap();
        let mut w = PageRequestRoundTrip::new(&vm).unwrap();
        let resident = vm.process().resident_pages();
        w.run(4).unwrap();
        assert_eq!(vm.process().resident_pages(), resident);
        ResidentFill::new(&vm).run(2).unwrap();
    }
}
