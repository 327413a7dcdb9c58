//! The forwarded path across processes' boundary: the same guest workloads as
//! [`super::forward`], on a VMM whose host is a `vsva host` service served in a thread ([`HostThread`])
//! of the bench over a real UNIX socket (issue 12's goals). Every host call is a frame on
//! the socket, answered by the service's connection thread.
//!
//! - [`SocketForwardedInvalidation`]: one resident page's `mprotect`, whose IOTLB and
//!   device-TLB descriptors the vIOMMU forwards as `VFIO_IOMMU_CACHE_INVALIDATE` over the
//!   socket.
//! - [`SocketPageRequest`]: a device fill of an unmapped page; the page request is read
//!   from the host's fault queue over the socket and the response written back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vsva_guest::{process::Process, process::Prot};
use vsva_hw::dma::{CompletionStatus, Operation};
use vsva_hw::memory::PAGE_SIZE;
use vsva_service::{ring::SpinRegardlessOfLoad, server::HostConfig, thread::HostThread};
use vsva_vmm::VIommuStats;
use vsva_vtd::{addr::Gva, addr::Pasid, flpte::FlPagingMode};

use super::pin::PinnedApart;
use super::{BenchError, Workload};
use crate::remote::RemoteVm;
use crate::stack::Uapi;

/// Guest RAM of the remote VM.
const RAM: u64 = 32 << 20;
/// The word the device fills write.
const FILL_PATTERN: u64 = 0x0f0f_f0f0_5a5a_a5a5;

/// A `vsva host` service in a thread of this process, listening on a socket of its own,
/// and one VM connected to it with a bound 4-level process that has one resident page.
/// Dropping it shuts the VM down, stops the service and removes the socket.
///
/// While it lives, both sides of its call ring spin for each other whatever the machine's
/// load ([`SpinRegardlessOfLoad`]): its figures are those of the spinning path, each call
/// finding the other side awake. Left to adapt, each side spins or sleeps by the load of
/// the moment, and the figure was whichever mix the moment chose (on the idle machine
/// 1.3 µs in a full run and 4.7 µs in the quick run after it; 1.5 to 2.9 µs in ten full
/// runs). Spinning pays only with the two sides on two cores: while it lives, the thread
/// that made it runs on the first CPU it may use and the host's threads on the second
/// (when it may use two), and it gets its CPUs back when the VM is dropped.
pub struct SocketVm {
    _spin: SpinRegardlessOfLoad,
    vm: Option<RemoteVm>,
    process: Option<Arc<Process>>,
    pasid: Pasid,
    page: Gva,
    record: Gva,
    host: HostThread,
    /// Dropped last: the bench's thread gets its CPUs back once the host has stopped.
    _apart: PinnedApart,
}

impl SocketVm {
    /// Starts the service, connects and boots the VM, binds the process and has the
    /// device fill its page once (so the IOMMU and the device TLB hold it).
    pub fn new() -> Result<Self, BenchError> {
        let (host, apart) =
            PinnedApart::start(|| HostThread::start("bench", &HostConfig::default()));
        let mut this = SocketVm {
            _spin: SpinRegardlessOfLoad::begin(),
            vm: None,
            process: None,
            pasid: Pasid::from_low_bits(0),
            page: Gva(0),
            record: Gva(0),
            host: host?,
            _apart: apart,
        };
        let vm = RemoteVm::connect(&this.host.path, 0, RAM, None, Uapi::Type1)?;
        let process = vm.vmm.spawn(FlPagingMode::FourLevel)?;
        this.vm = Some(vm);
        this.page = process.mmap(PAGE_SIZE, Prot::READ_WRITE)?;
        this.record = process.mmap(PAGE_SIZE, Prot::READ_WRITE)?;
        this.pasid = this.vm().vmm.bind(&process)?;
        this.process = Some(process);
        this.fill(this.page)?;
        Ok(this)
    }

    fn vm(&self) -> &RemoteVm {
        self.vm.as_ref().expect("the VM is present until dropped")
    }

    fn process(&self) -> &Arc<Process> {
        self.process
            .as_ref()
            .expect("the process is present until dropped")
    }

    fn viommu(&self) -> VIommuStats {
        self.vm().vmm.viommu.stats()
    }

    /// The device fills the page at `dst`; the completion record must say success.
    fn fill(&self, dst: Gva) -> Result<(), BenchError> {
        let op = Operation::Fill {
            pattern: FILL_PATTERN,
            dst: dst.0,
            size: PAGE_SIZE as u32,
        };
        let rec = self
            .vm()
            .vmm
            .run(self.process(), self.pasid, op, self.record)?;
        if rec.status != CompletionStatus::Success || u64::from(rec.bytes_completed) != PAGE_SIZE {
            return Err(BenchError::Check(format!(
                "a device fill of one page at {dst} over the socket completed with {rec:?}"
            )));
        }
        let mut word = [0u8; 8];
        self.process().read(dst, &mut word)?;
        if u64::from_le_bytes(word) != FILL_PATTERN {
            return Err(BenchError::Check(format!(
                "the device's fill at {dst} is not in guest RAM"
            )));
        }
        Ok(())
    }
}

impl Drop for SocketVm {
    fn drop(&mut self) {
        drop(self.process.take());
        if let Some(vm) = self.vm.take() {
            if let Err(e) = vm.shutdown() {
                tracing::warn!("socket bench VM shutdown: {e}");
            }
        }
        // Dropping `host` then stops the service and removes its socket.
    }
}

/// Fails when the vIOMMU's host calls failed between `before` and `after`.
fn no_host_errors(before: &VIommuStats, after: &VIommuStats) -> Result<(), BenchError> {
    let errors = after.host_errors - before.host_errors;
    if errors != 0 {
        return Err(BenchError::Check(format!(
            "{errors} of the vIOMMU's host calls over the socket failed"
        )));
    }
    Ok(())
}

/// `mprotect` of the resident page, rights unchanged: its forwarded invalidations cross
/// the socket. Each must have been forwarded, each as one `VFIO_IOMMU_CACHE_INVALIDATE` answered
/// with success (the connection times each), and no host call may fail; after the run the device's next fill of the page must
/// walk again and succeed. An operation is one `mprotect`.
///
/// Each sample begins with one operation untimed. Between samples the host's connection
/// thread has spun out its budget and sleeps (the in-process twin's sample runs for a
/// millisecond in between), so a sample's first call rings the doorbell and waits for the
/// thread to wake: a cost of the sampling, not of the spinning path, and one that varies
/// with how long the host's vCPU takes to wake. Timed, it was spread over the sample's
/// operations in a share that varied with the wake-up; and when a wake-up took a quarter
/// of a sample during calibration, every sample was a few operations each waking the host
/// (24.6 µs a forwarded invalidation in one quick run of 28 on the idle machine, against
/// 1.5 µs).
pub struct SocketForwardedInvalidation<'a> {
    vm: &'a SocketVm,
    /// Invalidations the vIOMMU forwards per operation.
    waits: u64,
}

impl<'a> SocketForwardedInvalidation<'a> {
    /// Runs one operation and counts the invalidations it forwards.
    pub fn new(vm: &'a SocketVm) -> Result<Self, BenchError> {
        let before = vm.viommu();
        vm.process()
            .mprotect(vm.page, PAGE_SIZE, Prot::READ_WRITE)?;
        let after = vm.viommu();
        no_host_errors(&before, &after)?;
        let waits = after.invalidations_forwarded - before.invalidations_forwarded;
        let calls = vm.vm().link().take_timings().fwd_inv.len() as u64;
        if waits == 0 || calls < waits {
            return Err(BenchError::Check(format!(
                "an mmu-notifier invalidation forwarded {waits} invalidations in {calls} calls answered over the socket"
            )));
        }
        Ok(SocketForwardedInvalidation { vm, waits })
    }

    /// Invalidations one operation forwards over the socket.
    pub fn waits_per_op(&self) -> u64 {
        self.waits
    }
}

impl Workload for SocketForwardedInvalidation<'_> {
    fn run(&mut self, iters: u64) -> Result<Duration, BenchError> {
        let (process, page) = (self.vm.process(), self.vm.page);
        // One operation untimed first: it wakes the host's connection thread, asleep
        // since the last sample (see `SocketVm`), so the sample times the spinning path.
        process.mprotect(page, PAGE_SIZE, Prot::READ_WRITE)?;
        let _ = self.vm.vm().link().take_timings();
        let before = self.vm.viommu();
        let start = Instant::now();
        for _ in 0..iters {
            process.mprotect(page, PAGE_SIZE, Prot::READ_WRITE)?;
        }
        let t = start.elapsed();
        let after = self.vm.viommu();
        no_host_errors(&before, &after)?;
        let forwarded = after.invalidations_forwarded - before.invalidations_forwarded;
        let answered = self.vm.vm().link().take_timings().fwd_inv.len() as u64;
        if forwarded != iters * self.waits || answered != forwarded {
            return Err(BenchError::Check(format!(
                "{iters} mmu-notifier invalidations forwarded {forwarded} host invalidations in {answered} calls answered over the socket, not {} each",
                self.waits
            )));
        }
        self.vm.fill(page)?;
        Ok(t)
    }
}

/// The device fills a page of the process that is reserved but not mapped: the page
/// request and its response cross the socket, and the retry succeeds. An operation is the
/// whole descriptor, as [`super::forward::PageRequestRoundTrip`] times it in one process;
/// between operations, not timed, the page is unmapped and reserved again. Each sample
/// begins with one operation untimed, as [`SocketForwardedInvalidation`]'s does.
pub struct SocketPageRequest<'a> {
    vm: &'a SocketVm,
    page: Gva,
}

impl<'a> SocketPageRequest<'a> {
    /// Reserves the page.
    pub fn new(vm: &'a SocketVm) -> Result<Self, BenchError> {
        let page = vm.process().mmap_lazy(PAGE_SIZE, Prot::READ_WRITE)?;
        Ok(SocketPageRequest { vm, page })
    }
}

impl Workload for SocketPageRequest<'_> {
    fn run(&mut self, iters: u64) -> Result<Duration, BenchError> {
        let process = self.vm.process();
        let served = |vm: &SocketVm| vm.vm().vmm.driver.stats().page_requests_served;
        let again = || -> Result<(), BenchError> {
            process.munmap(self.page, PAGE_SIZE)?;
            process.mmap_fixed(self.page, PAGE_SIZE, Prot::READ_WRITE, false)?;
            Ok(())
        };
        // One operation untimed first, as in `SocketForwardedInvalidation::run`.
        self.vm.fill(self.page)?;
        again()?;
        let (before, served_before) = (self.vm.viommu(), served(self.vm));
        let _ = self.vm.vm().link().take_timings();
        let mut timed = Duration::ZERO;
        for _ in 0..iters {
            let t0 = Instant::now();
            self.vm.fill(self.page)?;
            timed += t0.elapsed();
            again()?;
        }
        no_host_errors(&before, &self.vm.viommu())?;
        let guest = served(self.vm) - served_before;
        let round_trips = self.vm.vm().link().take_timings().prq.len() as u64;
        if (guest, round_trips) != (iters, iters) {
            return Err(BenchError::Check(format!(
                "{iters} fills of an unmapped page over the socket: {guest} page requests served by the guest, {round_trips} round trips answered by the host"
            )));
        }
        Ok(timed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalidations_and_page_requests_cross_the_socket() {
        let vm = SocketVm::new().unwrap();
        let mut inv = SocketForwardedInvalidation::new(&vm).unwrap();
        assert_eq!(inv.waits_per_op(), 2);
        inv.run(3).unwrap();
        let resident = vm.process().resident_pages();
        SocketPageRequest::new(&vm).unwrap().run(3).unwrap();
        assert_eq!(vm.process().resident_pages(), resident);
    }
}
