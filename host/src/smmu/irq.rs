//! The SMMU's interrupts on the host: Linux's arm-smmu-v3 requests threaded handlers for
//! the event queue, the PRI queue and GERROR (`arm_smmu_setup_unique_irqs`), or one
//! combined line whose thread serves both queues (`arm_smmu_combined_irq_thread`). Here
//! the SMMU's three MSIs ring one doorbell, the platform's MSI controller, whose handler
//! only marks the source pending and wakes one interrupt thread; the thread serves GERROR
//! (`arm_smmu_gerror_handler`), then the event queue (`arm_smmu_evtq_thread`), then the
//! PRI queue (`arm_smmu_priq_thread`), with the driver's lock, as often as MSIs arrive.
//!
//! A record written before its MSI is seen by the drain the MSI causes, so no record waits
//! for a later interrupt. One difference from Linux: when GERROR reports that a queue's MSI
//! aborted (MSI_EVENTQ_ABT_ERR, MSI_PRIQ_ABT_ERR), that queue is served as if the MSI had
//! arrived; Linux only logs it and the records wait for the next interrupt.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::thread::{JoinHandle, ThreadId};
use std::time::Duration;

use vsva_smmuv3::regs::{gerror, Irq};

use super::SmmuHost;

/// The MSI doorbell the host programs in IRQ_CFG0: the platform's MSI controller decodes
/// writes to it (as a GICv3 ITS decodes GITS_TRANSLATER). It lies far above any host RAM.
pub const MSI_DOORBELL: u64 = 0x8_0000_0001_0040;

/// How long stopping the interrupt thread waits for it to finish what it is serving.
pub const IRQ_JOIN_TIMEOUT: Duration = Duration::from_secs(20);

/// The MSI data of an interrupt source (what a platform MSI's event id would be).
pub(super) fn msi_data(irq: Irq) -> u32 {
    irq as u32
}

/// The pending bit of the source whose MSI data is `data`, 0 for data the host never
/// programmed.
fn pending_bit(data: u32) -> u32 {
    [Irq::Gerror, Irq::Eventq, Irq::Priq]
        .into_iter()
        .find(|&irq| msi_data(irq) == data)
        .map_or(0, |irq| 1 << irq as u32)
}

const GERROR: u32 = 1 << Irq::Gerror as u32;
const EVENTQ: u32 = 1 << Irq::Eventq as u32;
const PRIQ: u32 = 1 << Irq::Priq as u32;

/// What the interrupt thread did, for tests and diagnostics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqStats {
    /// MSIs the doorbell received.
    pub msis: u64,
    /// Event queue records served by the interrupt path.
    pub events: u64,
    /// Event queue overflows found and acknowledged.
    pub event_overflows: u64,
    /// PRI queue entries served by the interrupt path.
    pub page_requests: u64,
    /// PRI queue overflows found and acknowledged.
    pub priq_overflows: u64,
    /// Stalled transactions delivered to a container as page requests.
    pub stalls: u64,
    /// Stalled transactions aborted at once (no container took them).
    pub stalls_aborted: u64,
    /// GERROR interrupts that found active errors, which were then acknowledged.
    pub gerrors: u64,
    /// Every global error bit acknowledged so far, OR-ed.
    pub gerror_bits: u32,
}

#[derive(Debug, Default)]
pub(super) struct Counters {
    msis: AtomicU64,
    events: AtomicU64,
    event_overflows: AtomicU64,
    page_requests: AtomicU64,
    priq_overflows: AtomicU64,
    stalls: AtomicU64,
    stalls_aborted: AtomicU64,
    gerrors: AtomicU64,
    gerror_bits: AtomicU64,
}

impl Counters {
    pub(super) fn snapshot(&self) -> IrqStats {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        IrqStats {
            msis: l(&self.msis),
            events: l(&self.events),
            event_overflows: l(&self.event_overflows),
            page_requests: l(&self.page_requests),
            priq_overflows: l(&self.priq_overflows),
            stalls: l(&self.stalls),
            stalls_aborted: l(&self.stalls_aborted),
            gerrors: l(&self.gerrors),
            gerror_bits: l(&self.gerror_bits) as u32,
        }
    }

    /// Counts one drain of the event queue.
    pub(super) fn events(&self, records: usize, overflowed: bool) {
        self.events.fetch_add(records as u64, Ordering::Relaxed);
        if overflowed {
            self.event_overflows.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts one stall event, `delivered` to a container or aborted.
    pub(super) fn stall(&self, delivered: bool) {
        let c = if delivered {
            &self.stalls
        } else {
            &self.stalls_aborted
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one drain of the PRI queue.
    pub(super) fn page_requests(&self, records: usize, overflowed: bool) {
        self.page_requests
            .fetch_add(records as u64, Ordering::Relaxed);
        if overflowed {
            self.priq_overflows.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts acknowledged global errors `bits` (none: nothing was active).
    pub(super) fn gerror(&self, bits: u32) {
        if bits != 0 {
            self.gerrors.fetch_add(1, Ordering::Relaxed);
            self.gerror_bits.fetch_or(bits as u64, Ordering::Relaxed);
        }
    }
}

/// What the doorbell and the thread share.
#[derive(Debug, Default)]
struct Line {
    state: Mutex<LineState>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct LineState {
    /// Sources whose MSI arrived since the thread last looked.
    pending: u32,
    stop: bool,
}

impl Line {
    fn lock(&self) -> MutexGuard<'_, LineState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The doorbell's handler: marks the source pending and wakes the thread; it never
    /// waits for anything but this lock, which nobody holds while calling the SMMU.
    fn ring(&self, bits: u32) {
        self.lock().pending |= bits;
        self.wake.notify_one();
    }

    /// Waits for pending sources, `None` once stopped.
    fn wait(&self) -> Option<u32> {
        let mut s = self.lock();
        loop {
            if s.stop {
                return None;
            }
            if s.pending != 0 {
                return Some(std::mem::take(&mut s.pending));
            }
            s = self.wake.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn stop(&self) {
        self.lock().stop = true;
        self.wake.notify_all();
    }
}

/// The running interrupt thread of one SMMU.
#[derive(Debug)]
pub(super) struct IrqThread {
    line: Arc<Line>,
    handle: JoinHandle<()>,
    /// Disconnected when the thread's body has returned.
    done: mpsc::Receiver<()>,
}

impl IrqThread {
    /// Starts the thread for `host`, which it holds only while serving an interrupt, and
    /// gives the doorbell's handler.
    pub(super) fn spawn(
        host: Weak<SmmuHost>,
        counters: Arc<Counters>,
    ) -> std::io::Result<(IrqThread, vsva_hw::smmuv3::MsiHandler)> {
        let line = Arc::new(Line::default());
        let (done_tx, done) = mpsc::channel::<()>();
        let thread_line = line.clone();
        let handle = std::thread::Builder::new()
            .name("smmuv3-irq".into())
            .spawn(move || {
                let _done = done_tx;
                while let Some(pending) = thread_line.wait() {
                    let Some(host) = host.upgrade() else {
                        break;
                    };
                    host.serve(pending);
                }
            })?;
        let bell = line.clone();
        let handler: vsva_hw::smmuv3::MsiHandler = Arc::new(move |data| {
            counters.msis.fetch_add(1, Ordering::Relaxed);
            let bit = pending_bit(data);
            if bit == 0 {
                tracing::warn!(data, "smmuv3: MSI with data the host did not program");
                return;
            }
            bell.ring(bit);
        });
        Ok((IrqThread { line, handle, done }, handler))
    }

    /// Marks every source pending: serves what was queued before the MSIs were enabled.
    pub(super) fn kick(&self) {
        self.line.ring(GERROR | EVENTQ | PRIQ);
    }

    /// The thread's id.
    pub(super) fn id(&self) -> ThreadId {
        self.handle.thread().id()
    }

    /// Stops the thread and joins it, waiting at most [`IRQ_JOIN_TIMEOUT`] for it to
    /// finish what it serves; false (the thread left to end by itself) when it did not.
    pub(super) fn stop(self) -> bool {
        self.line.stop();
        match self.done.recv_timeout(IRQ_JOIN_TIMEOUT) {
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                if self.handle.join().is_err() {
                    tracing::error!("smmuv3: the interrupt thread panicked");
                }
                true
            }
            Ok(()) | Err(mpsc::RecvTimeoutError::Timeout) => false,
        }
    }

    /// Stops the thread without waiting: for the thread itself, which ends after the
    /// interrupt it is serving.
    pub(super) fn detach(self) {
        self.line.stop();
    }
}

impl SmmuHost {
    /// One pass of the interrupt thread over the `pending` sources: GERROR first, as the
    /// hard interrupt handler runs before the threads, then the queues whose MSI arrived or
    /// whose MSI GERROR reports aborted.
    fn serve(&self, pending: u32) {
        let mut pending = pending;
        if pending & GERROR != 0 {
            let active = self.gerror_irq();
            if active & gerror::MSI_EVENTQ_ABT_ERR != 0 {
                pending |= EVENTQ;
            }
            if active & gerror::MSI_PRIQ_ABT_ERR != 0 {
                pending |= PRIQ;
            }
        }
        if pending & EVENTQ != 0 {
            self.evtq_irq();
        }
        if pending & PRIQ != 0 {
            self.priq_irq();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msi_data_names_one_source() {
        assert_eq!(pending_bit(msi_data(Irq::Gerror)), GERROR);
        assert_eq!(pending_bit(msi_data(Irq::Eventq)), EVENTQ);
        assert_eq!(pending_bit(msi_data(Irq::Priq)), PRIQ);
        assert_eq!(pending_bit(7), 0);
    }

    #[test]
    fn the_line_gives_pending_sources_once_and_stops() {
        let line = Line::default();
        line.ring(EVENTQ);
        line.ring(PRIQ);
        assert_eq!(line.wait(), Some(EVENTQ | PRIQ));
        line.ring(GERROR);
        line.stop();
        assert_eq!(line.wait(), None);
    }
}
