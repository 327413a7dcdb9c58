//! The DMA engine: work queue, descriptor execution, completion records, page requests.
//!
//! Software writes a 64-byte descriptor to the portal (an ENQCMD/MOVDIR64B-style write);
//! the engine queues it and executes it when [`DmaEngine::process`] runs (device time). An
//! operation runs a request at a time, a request being at most a page: each operand is
//! translated once per page (an untranslated request, or with ATS a device-TLB lookup or
//! translation request followed by translated requests). Memmove moves bytes HPA to HPA:
//! copying upwards, the requests up to the end of either operand's translated run are
//! checked at once (one check of each operand's bytes with the IOMMU and host memory; the
//! IOMMU translated and checked each page of the runs), and consecutive requests whose
//! source and destination both continue in host memory join a run, which is one
//! overlap-safe copy there ([`HostMemory::copy`]). Fill and compare go through a bounce
//! buffer of a page.
//!
//! Memmove copies from the top down when the descriptor's destination overlaps its source
//! from above (result 1 in the record). The direction is decided on the descriptor's
//! addresses, which cannot show that two of them reach the same frame: such an alias is
//! copied exactly within a run (one memmove in host memory), so a copy between aliases of
//! frames that are contiguous in host memory is a memmove of the bytes; across runs, which
//! go in the descriptor's direction, an alias that puts the destination above the source
//! in frames that are not contiguous can overwrite source bytes before they are read.
//! A run's translations are all taken before its bytes move, under a ticket of the
//! [`RequestDrain`] that the invalidations of those translations complete through (the
//! IOMMU's, or with ATS the device TLB's own): the run's bytes move in flight, entered
//! with that ticket, so an invalidation does not complete while they move; and when an
//! invalidation completed since the ticket the run's translations are dropped and taken
//! again. After [`DRAIN_RETRY_LIMIT`] refusals in a row without progress the request fails.
//!
//! A translation fault that the IOMMU calls recoverable, on a block-on-fault descriptor
//! with PRI enabled, sends a page request and parks the descriptor; the PRG response
//! resumes it from the byte where it stopped (Success) or completes it with
//! `PageResponseError`. Otherwise a fault completes the descriptor partially with the
//! faulting address and the bytes done, as DSA does.
//!
//! Locks: `exec` is held while descriptors run and calls into the port; the port may call
//! back into every other entry point (`page_response`, `invalidate_devtlb`,
//! `portal_write`, a nested `process`) since those take only short-lived locks. CTRL and
//! STATUS are atomic words that a pass reads without a lock: CTRL changes only with `exec`
//! and the work queue held (so neither a pass nor a portal write sees it change under
//! them), STATUS's bits are set by a pass and cleared by software's write-1-to-clear.
//! Each counter is written by one thread at a time, the holder of the lock its field
//! names, and so is counted with a load and a store rather than a locked add.
//!
//! [`HostMemory::copy`]: crate::memory::HostMemory::copy

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use vsva_mem::PhysMem;

use vsva_vtd::inv_desc::ResponseCode;
use vsva_vtd::{addr::Hpa, addr::Pasid};

use super::descriptor::{
    CompletionRecord, CompletionRequest, CompletionStatus, Descriptor, DescriptorError, Operation,
    RawDescriptor, COMPLETION_RECORD_ALIGN, COMPLETION_RECORD_SIZE, DESCRIPTOR_SIZE, FLAG_CRAV,
};
use super::devtlb::{DevTlb, OvertakenCompletion};
use super::port::{
    AtsEndpoint, DevTlbInvalidation, DmaAccess, DmaFault, DmaPort, DmaRun, DmaTranslation,
    PageRequestMessage, PcieCapabilities, PrgResponse, PRG_INDEX_COUNT,
};
use super::regs::*;
use crate::drain::{InFlight, RequestDrain, Ticket};
use crate::memory::PAGE_SIZE;

/// Bytes per memory request at most (a page), and the size of each bounce buffer of fill
/// and compare.
const REQUEST: u64 = PAGE_SIZE;

/// How many Success responses in a row may leave a descriptor faulting at the same place
/// before the engine gives up with `PageFault`: a model guard against an IOMMU that
/// answers Success without making the page present, which would otherwise retry forever.
pub const PRI_RETRY_LIMIT: u8 = 4;

/// How many translation completions in a row an invalidate request may overtake before a
/// request gives up with a non-recoverable translation fault: a model guard against a
/// stream of device-TLB invalidations that would otherwise keep a descriptor retrying.
pub const ATS_RETRY_LIMIT: u8 = 8;

/// How many times in a row an invalidation may complete between a request's translation
/// and its bytes moving before the request gives up with a non-recoverable translation
/// fault (reason 0): the same guard as [`ATS_RETRY_LIMIT`], for a stream of invalidations
/// that would otherwise keep a request translating again.
pub const DRAIN_RETRY_LIMIT: u8 = 8;

/// Counters for the demo and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DmaStats {
    /// Descriptors accepted by the portal.
    pub submitted: u64,
    /// Descriptors completed, whatever their status.
    pub completed: u64,
    /// Of those, completed with a status other than Success.
    pub failed: u64,
    /// Bytes written by memmove and fill.
    pub bytes_moved: u64,
    /// Copies in host memory by memmove, each of a run of bytes contiguous there in both
    /// operands.
    pub memmove_runs: u64,
    /// Bytes compared.
    pub bytes_compared: u64,
    /// Untranslated requests' translations.
    pub translations: u64,
    /// Device-TLB lookups that granted the access without an ATS translation request.
    pub devtlb_hits: u64,
    /// Device-TLB misses, each an ATS translation request.
    pub devtlb_misses: u64,
    /// Invalidate requests received.
    pub devtlb_invalidations: u64,
    /// Translation completions an invalidate request overtook, dropped and re-requested.
    pub ats_overtaken: u64,
    /// Requests whose translations an invalidation completed on before their bytes moved,
    /// translated again.
    pub drain_refused: u64,
    /// Page requests issued for recoverable faults (block on fault).
    pub page_requests: u64,
    /// PRG responses received, expected or not.
    pub page_responses: u64,
    /// Errors recorded in the software error register.
    pub software_errors: u64,
}

/// The counters, read at any time by [`DmaEngine::stats`]. Each is written only with one
/// lock held (`submitted` with `wq`, `devtlb_invalidations` with `devtlb`, the rest with
/// `exec`), so its writes never race and [`bump`] needs no locked add.
#[derive(Default)]
struct Counters {
    submitted: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    bytes_moved: AtomicU64,
    memmove_runs: AtomicU64,
    bytes_compared: AtomicU64,
    translations: AtomicU64,
    devtlb_hits: AtomicU64,
    devtlb_misses: AtomicU64,
    /// `devtlb`.
    devtlb_invalidations: AtomicU64,
    ats_overtaken: AtomicU64,
    drain_refused: AtomicU64,
    page_requests: AtomicU64,
    page_responses: AtomicU64,
    software_errors: AtomicU64,
}

/// Adds `n` to a counter. The caller holds the lock that serialises the counter's writers
/// (see [`Counters`]): the load sees the last store, and readers see one or the other.
fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// The software error register.
#[derive(Debug, Default)]
struct Regs {
    swerr: Option<SoftwareError>,
    swerr_overflow: bool,
}

/// What waits for the engine: the queued descriptors and the PRG responses received, under
/// one lock, so that a pass of the engine takes both with one lock round trip.
#[derive(Debug, Default)]
struct WorkQueue {
    next_seq: u64,
    queue: VecDeque<(u64, RawDescriptor)>,
    responses: Vec<PrgResponse>,
}

/// Where a descriptor is in its life.
#[derive(Clone, Copy, Debug)]
enum Stage {
    /// Running the operation; `done` bytes are complete.
    Execute,
    /// The operation is over; the record still has to be written.
    Complete(CompletionRecord),
}

#[derive(Clone, Copy, Debug)]
struct Job {
    seq: u64,
    opcode: u8,
    desc: Descriptor,
    done: u64,
    stage: Stage,
    /// The last page request's (address, bytes done), and how many Success responses in a
    /// row found the descriptor stuck there.
    last_request: Option<(u64, u64)>,
    stalls: u8,
}

/// Why an operation stopped before its end.
#[derive(Clone, Copy, Debug)]
enum Stop {
    Fault {
        addr: u64,
        access: DmaAccess,
        fault: DmaFault,
    },
    Memory {
        addr: u64,
        write: bool,
    },
}

/// Bytes of a memmove that are contiguous in host memory in both operands, moved by one
/// copy: `len` bytes from `src_hpa` to `dst_hpa`, which device address `dst` maps to.
#[derive(Clone, Copy, Debug)]
struct Run {
    dst: u64,
    src_hpa: Hpa,
    dst_hpa: Hpa,
    len: u64,
}

impl Run {
    /// Adds `next`, the request after the run in copy order (above it when ascending,
    /// below it when descending), when it continues the run in host memory for both
    /// operands; otherwise leaves the run as it is and returns `false`.
    fn join(&mut self, next: Run, descending: bool) -> bool {
        let (low, high) = if descending {
            (next, *self)
        } else {
            (*self, next)
        };
        let follows = |a: Hpa, b: Hpa| a.0.checked_add(low.len) == Some(b.0);
        if !follows(low.src_hpa, high.src_hpa) || !follows(low.dst_hpa, high.dst_hpa) {
            return false;
        }
        *self = Run {
            len: low.len + high.len,
            ..low
        };
        true
    }
}

#[derive(Debug)]
struct Parked {
    job: Job,
    prgi: u16,
    addr: u64,
    access: DmaAccess,
    reason: u8,
}

/// The bounce buffers of fill and compare (a request each), and what fill left in the
/// first: its pattern turned to a phase and how many bytes of it, which the next fill with
/// that pattern and phase uses again instead of writing the bytes anew.
struct Bounce {
    buf: Box<[u8]>,
    pattern: Option<(u64, usize)>,
}

impl Bounce {
    /// The first `n` bytes of the first buffer, eight-byte words of `turned` (its
    /// little-endian bytes) and as many of its bytes as end the `n`.
    fn fill(&mut self, turned: u64, n: usize) -> &[u8] {
        if !matches!(self.pattern, Some((p, len)) if p == turned && len >= n) {
            let bytes = turned.to_le_bytes();
            let mut words = self.buf[..n].chunks_exact_mut(8);
            for word in &mut words {
                word.copy_from_slice(&bytes);
            }
            let rest = words.into_remainder();
            rest.copy_from_slice(&bytes[..rest.len()]);
            self.pattern = Some((turned, n));
        }
        &self.buf[..n]
    }

    /// Both buffers, for compare, which overwrites them.
    fn both(&mut self) -> (&mut [u8], &mut [u8]) {
        self.pattern = None;
        self.buf.split_at_mut(REQUEST as usize)
    }
}

struct Exec {
    parked: Vec<Parked>,
    drains: Vec<Job>,
    bounce: Bounce,
    completed: usize,
}

/// A PASID-capable DMA engine behind an IOMMU.
pub struct DmaEngine {
    config: DmaEngineConfig,
    port: Arc<dyn DmaPort>,
    /// CTRL: written with `exec` and `wq` held (see the module's doc).
    ctrl: AtomicU64,
    /// STATUS's write-1-to-clear bits.
    status: AtomicU64,
    regs: Mutex<Regs>,
    wq: Mutex<WorkQueue>,
    devtlb: Mutex<DevTlb>,
    /// What an invalidate request of the device TLB completes through (PCIe ATS: the
    /// completion follows every request that used a dropped entry).
    devtlb_drain: RequestDrain,
    exec: Mutex<Exec>,
    /// How many descriptors `exec` holds parked, stored with `exec` held whenever that
    /// changes, so that [`DmaEngine::waiting_for_page_response`] takes no lock.
    parked: AtomicUsize,
    counters: Counters,
}

impl std::fmt::Debug for DmaEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaEngine")
            .field("config", &self.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// The per-operand run of translated pages in use: re-translated only when the address
/// leaves it.
type Cursor = Option<DmaRun>;

/// The ticket an operation's translations are taken under, in the [`RequestDrain`] their
/// invalidations complete through.
struct Epoch<'d> {
    drain: &'d RequestDrain,
    ticket: Ticket,
    /// Refusals in a row (see [`DRAIN_RETRY_LIMIT`]).
    refused: u8,
}

impl<'d> Epoch<'d> {
    fn new(drain: &'d RequestDrain) -> Self {
        Epoch {
            drain,
            ticket: drain.ticket(),
            refused: 0,
        }
    }

    /// Puts the bytes about to move with the translations taken so far in flight. `None`
    /// when an invalidation completed since they were taken: they are forgotten (the
    /// cursors cleared) and the ticket renewed, to translate again; a fault at `addr` for
    /// `access` after [`DRAIN_RETRY_LIMIT`] refusals in a row.
    fn enter(
        &mut self,
        counters: &Counters,
        cursors: &mut [&mut Cursor],
        addr: u64,
        access: DmaAccess,
    ) -> Result<Option<InFlight<'d>>, Stop> {
        if let Some(guard) = self.drain.enter(self.ticket) {
            self.refused = 0;
            return Ok(Some(guard));
        }
        bump(&counters.drain_refused, 1);
        cursors.iter_mut().for_each(|c| **c = None);
        self.ticket = self.drain.ticket();
        self.refused += 1;
        if self.refused >= DRAIN_RETRY_LIMIT {
            return Err(Stop::Fault {
                addr,
                access,
                fault: DmaFault {
                    reason: 0,
                    recoverable: false,
                },
            });
        }
        Ok(None)
    }
}

impl DmaEngine {
    /// An engine with `config`, doing DMA through `port`. It starts disabled.
    pub fn new(config: DmaEngineConfig, port: Arc<dyn DmaPort>) -> Result<Self, DmaError> {
        if !config.is_valid() {
            return Err(DmaError::BadConfig);
        }
        Ok(DmaEngine {
            config,
            port,
            ctrl: AtomicU64::new(0),
            status: AtomicU64::new(0),
            regs: Mutex::new(Regs::default()),
            wq: Mutex::new(WorkQueue::default()),
            devtlb: Mutex::new(DevTlb::new(config.devtlb_entries)),
            devtlb_drain: RequestDrain::new(),
            exec: Mutex::new(Exec {
                parked: Vec::with_capacity(usize::from(config.pri_capacity)),
                drains: Vec::new(),
                bounce: Bounce {
                    buf: vec![0u8; 2 * REQUEST as usize].into_boxed_slice(),
                    pattern: None,
                },
                completed: 0,
            }),
            parked: AtomicUsize::new(0),
            counters: Counters::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &DmaEngineConfig {
        &self.config
    }

    /// Reads a 64-bit register.
    pub fn mmio_read(&self, offset: u64) -> Result<u64, DmaError> {
        let regs = || self.regs.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(match offset {
            REG_CAP => self.config.cap(),
            REG_CTRL => self.ctrl(),
            REG_STATUS => {
                let enabled = if self.ctrl() & CTRL_ENABLE != 0 {
                    STATUS_ENABLED
                } else {
                    0
                };
                self.status.load(Ordering::Acquire) | enabled
            }
            REG_SWERR0 => {
                let regs = regs();
                let w0 = regs.swerr.map_or(0, |e| e.to_regs().0);
                w0 | if regs.swerr_overflow {
                    SWERR_OVERFLOW
                } else {
                    0
                }
            }
            REG_SWERR1 => regs().swerr.map_or(0, |e| e.to_regs().1),
            _ => return Err(DmaError::NoRegister(offset)),
        })
    }

    /// CTRL as last written.
    fn ctrl(&self) -> u64 {
        self.ctrl.load(Ordering::Acquire)
    }

    /// Writes a 64-bit register. CTRL's configuration bits change only while the engine is
    /// disabled, and disabling needs an idle engine; STATUS and SWERR0 are
    /// write-1-to-clear.
    pub fn mmio_write(&self, offset: u64, value: u64) -> Result<(), DmaError> {
        match offset {
            REG_CTRL => self.write_ctrl(value),
            REG_STATUS => {
                let clearable = STATUS_PRI_RF | STATUS_PRI_UPRGI;
                if value & !clearable != 0 {
                    return Err(DmaError::ReadOnly(offset));
                }
                self.status.fetch_and(!value, Ordering::AcqRel);
                Ok(())
            }
            REG_SWERR0 => {
                if value & !(SWERR_VALID | SWERR_OVERFLOW) != 0 {
                    return Err(DmaError::ReadOnly(offset));
                }
                let mut regs = self.regs.lock().unwrap_or_else(PoisonError::into_inner);
                if value & SWERR_VALID != 0 {
                    regs.swerr = None;
                }
                if value & SWERR_OVERFLOW != 0 {
                    regs.swerr_overflow = false;
                }
                Ok(())
            }
            REG_CAP | REG_SWERR1 => Err(DmaError::ReadOnly(offset)),
            _ => Err(DmaError::NoRegister(offset)),
        }
    }

    fn write_ctrl(&self, value: u64) -> Result<(), DmaError> {
        let unsupported = value & !self.config.ctrl_mask();
        if unsupported != 0 {
            return Err(DmaError::Unsupported(unsupported));
        }
        // `exec` and `wq` held: no pass runs and no descriptor is queued while CTRL changes.
        let exec = self.exec.try_lock().map_err(|_| DmaError::Busy)?;
        let wq = self.wq.lock().unwrap_or_else(PoisonError::into_inner);
        let old = self.ctrl();
        if old == value {
            return Ok(());
        }
        if old & CTRL_ENABLE != 0 {
            if value != old & !CTRL_ENABLE {
                return Err(DmaError::ConfigWhileEnabled);
            }
            if !wq.queue.is_empty() || !exec.parked.is_empty() || !exec.drains.is_empty() {
                return Err(DmaError::Busy);
            }
        }
        if (old ^ value) & CTRL_ATS_EN != 0 {
            self.devtlb
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
        }
        self.ctrl.store(value, Ordering::Release);
        Ok(())
    }

    /// Enables a disabled engine with the CTRL feature bits `features`: the same as
    /// writing `features | CTRL_ENABLE` to CTRL.
    pub fn enable(&self, features: u64) -> Result<(), DmaError> {
        self.mmio_write(REG_CTRL, features | CTRL_ENABLE)
    }

    /// A 64-byte write to the portal at `offset`: queues the descriptor. `Retry` when the
    /// work queue is full (ENQCMD's retry indication).
    pub fn portal_write(&self, offset: u64, data: &[u8; DESCRIPTOR_SIZE]) -> Result<(), DmaError> {
        if offset >= PORTAL_SIZE || offset % DESCRIPTOR_SIZE as u64 != 0 {
            return Err(DmaError::PortalOffset(offset));
        }
        // CTRL read with `wq` held: a disable cannot come between the check and the push.
        let mut wq = self.wq.lock().unwrap_or_else(PoisonError::into_inner);
        if self.ctrl() & CTRL_ENABLE == 0 {
            return Err(DmaError::Disabled);
        }
        if wq.queue.len() >= usize::from(self.config.wq_size) {
            return Err(DmaError::Retry);
        }
        let seq = wq.next_seq;
        wq.next_seq += 1;
        wq.queue.push_back((seq, RawDescriptor::from_bytes(data)));
        bump(&self.counters.submitted, 1);
        Ok(())
    }

    /// Runs the engine until nothing can progress: pending PRG responses are acted on and
    /// queued descriptors executed (each completes or parks on a page request). Returns
    /// how many descriptors completed. Returns at once (0) when called while the engine is
    /// already running, for example from inside a port callback; the running call picks
    /// up any new work.
    pub fn process(&self) -> usize {
        let Ok(mut exec) = self.exec.try_lock() else {
            return 0;
        };
        let before = exec.completed;
        let ctrl = self.ctrl();
        // The responses are taken by swapping in this emptied list, so that the engine's
        // list keeps its capacity and a response does not allocate.
        let mut responses = Vec::new();
        loop {
            // The responses and the next descriptor under one lock; the responses are
            // acted on first, as they arrived before the descriptor is started.
            let next = {
                let mut wq = self.wq.lock().unwrap_or_else(PoisonError::into_inner);
                std::mem::swap(&mut responses, &mut wq.responses);
                let next = wq.queue.pop_front();
                if next.is_none() && responses.is_empty() {
                    // Nothing left: `exec` is let go with `wq` still held, so work queued
                    // from now on finds `exec` free, and a `process` called after queueing
                    // it runs it (none is left behind between this look and the unlock).
                    let completed = exec.completed - before;
                    drop(exec);
                    return completed;
                }
                next
            };
            for r in responses.drain(..) {
                self.on_response(&mut exec, ctrl, r);
            }
            if let Some((seq, raw)) = next {
                self.start(&mut exec, ctrl, seq, raw);
            }
        }
    }

    /// Whether nothing is queued, parked or running.
    pub fn is_idle(&self) -> bool {
        let Ok(exec) = self.exec.try_lock() else {
            return false;
        };
        exec.parked.is_empty() && exec.drains.is_empty() && {
            let wq = self.wq.lock().unwrap_or_else(PoisonError::into_inner);
            wq.queue.is_empty() && wq.responses.is_empty()
        }
    }

    /// Descriptors waiting for a page response.
    pub fn waiting_for_page_response(&self) -> usize {
        self.parked.load(Ordering::Acquire)
    }

    /// Counts the parked descriptors after `exec.parked` changed.
    fn parked_changed(&self, exec: &Exec) {
        self.parked.store(exec.parked.len(), Ordering::Release);
    }

    /// Valid device-TLB entries.
    pub fn devtlb_len(&self) -> usize {
        self.devtlb
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// The translation completions the device TLB refused because an invalidate request
    /// overtook them, since the last call (see [`DevTlb`]).
    pub fn take_overtaken_completions(&self) -> Vec<OvertakenCompletion> {
        self.devtlb
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take_overtaken()
    }

    /// The error held in the software error register.
    pub fn software_error(&self) -> Option<SoftwareError> {
        self.regs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .swerr
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> DmaStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DmaStats {
            submitted: get(&c.submitted),
            completed: get(&c.completed),
            failed: get(&c.failed),
            bytes_moved: get(&c.bytes_moved),
            memmove_runs: get(&c.memmove_runs),
            bytes_compared: get(&c.bytes_compared),
            translations: get(&c.translations),
            devtlb_hits: get(&c.devtlb_hits),
            devtlb_misses: get(&c.devtlb_misses),
            devtlb_invalidations: get(&c.devtlb_invalidations),
            ats_overtaken: get(&c.ats_overtaken),
            drain_refused: get(&c.drain_refused),
            page_requests: get(&c.page_requests),
            page_responses: get(&c.page_responses),
            software_errors: get(&c.software_errors),
        }
    }

    /// Counts a completed descriptor.
    fn completed(&self, exec: &mut Exec, success: bool) {
        exec.completed += 1;
        bump(&self.counters.completed, 1);
        if !success {
            bump(&self.counters.failed, 1);
        }
    }

    fn record_software_error(&self, err: SoftwareError) {
        bump(&self.counters.software_errors, 1);
        tracing::debug!(sid = %self.config.sid, ?err, "dma: software error");
        let mut regs = self.regs.lock().unwrap_or_else(PoisonError::into_inner);
        if regs.swerr.is_some() {
            regs.swerr_overflow = true;
        } else {
            regs.swerr = Some(err);
        }
    }

    /// Validates a queued descriptor and runs it.
    fn start(&self, exec: &mut Exec, ctrl: u64, seq: u64, raw: RawDescriptor) {
        let pasid_valid = raw.pasid().is_some();
        let privileged = raw.privileged();
        if (pasid_valid && ctrl & CTRL_PASID_EN == 0)
            || (privileged && (!pasid_valid || ctrl & CTRL_PRIV_EN == 0))
        {
            self.completed(exec, false);
            self.record_software_error(SoftwareError {
                status: CompletionStatus::PrivilegeBad,
                opcode: raw.opcode(),
                pasid: raw.pasid(),
                addr: raw.completion_addr,
            });
            return;
        }
        let decoded = Descriptor::decode(&raw).and_then(|d| {
            if u64::from(d.op.size()) > self.config.max_transfer() {
                Err(DescriptorError {
                    status: CompletionStatus::TransferSize,
                    invalid_flags: 0,
                })
            } else {
                Ok(d)
            }
        });
        let job = |desc| Job {
            seq,
            opcode: raw.opcode(),
            desc,
            done: 0,
            stage: Stage::Execute,
            last_request: None,
            stalls: 0,
        };
        match decoded {
            Ok(desc) if desc.op == Operation::Drain => {
                if exec.parked.iter().any(|p| p.job.seq < seq) {
                    exec.drains.push(job(desc));
                } else {
                    self.finish(
                        exec,
                        ctrl,
                        job(desc),
                        CompletionRecord::new(CompletionStatus::Success),
                    );
                }
            }
            Ok(desc) => self.run(exec, ctrl, job(desc)),
            Err(e) => {
                let mut record = CompletionRecord::new(e.status);
                record.invalid_flags = e.invalid_flags;
                let crav = raw.flags() & FLAG_CRAV != 0;
                if crav && raw.completion_addr % COMPLETION_RECORD_ALIGN == 0 {
                    // The record goes where the descriptor asked, in its address space.
                    let desc = Descriptor {
                        pasid: raw.pasid(),
                        privileged,
                        block_on_fault: false,
                        completion: CompletionRequest::OnError(raw.completion_addr),
                        op: Operation::Nop,
                    };
                    self.finish(exec, ctrl, job(desc), record);
                } else {
                    self.completed(exec, false);
                    self.record_software_error(SoftwareError {
                        status: e.status,
                        opcode: raw.opcode(),
                        pasid: raw.pasid(),
                        addr: raw.completion_addr,
                    });
                }
            }
        }
    }

    /// Runs a job from its current stage until it completes or parks.
    fn run(&self, exec: &mut Exec, ctrl: u64, mut job: Job) {
        if let Stage::Complete(record) = job.stage {
            self.write_completion(exec, ctrl, job, record);
            return;
        }
        let result = self.execute(&mut exec.bounce, ctrl, &mut job);
        let descending = u8::from(is_descending(&job.desc.op));
        match result {
            Ok(result) => {
                let mut record = CompletionRecord::new(CompletionStatus::Success);
                record.result = result | descending;
                record.bytes_completed = job.done as u32;
                self.finish(exec, ctrl, job, record);
            }
            Err(Stop::Fault {
                addr,
                access,
                fault,
            }) if fault.recoverable && job.desc.block_on_fault => {
                if let Err(record) = self.request_page(exec, ctrl, job, addr, access, fault) {
                    self.finish(exec, ctrl, job, record);
                }
            }
            Err(stop) => {
                let mut record = stop_record(stop, job.done);
                record.result = descending;
                self.finish(exec, ctrl, job, record);
            }
        }
    }

    /// Sends a page request for a recoverable fault and parks the job; or, when the engine
    /// may not (PRI off or failed, no group index free, no progress), the record to
    /// complete with.
    fn request_page(
        &self,
        exec: &mut Exec,
        ctrl: u64,
        mut job: Job,
        addr: u64,
        access: DmaAccess,
        fault: DmaFault,
    ) -> Result<(), CompletionRecord> {
        let stop = Stop::Fault {
            addr,
            access,
            fault,
        };
        let mut record = stop_record(stop, job.done);
        if let Stage::Execute = job.stage {
            record.result = u8::from(is_descending(&job.desc.op));
        }
        let pri_ok = ctrl & CTRL_PRI_EN != 0
            && self.status.load(Ordering::Acquire) & STATUS_PRI_RF == 0
            && exec.parked.len() < usize::from(self.config.pri_capacity);
        if !pri_ok {
            return Err(record);
        }
        if job.last_request == Some((addr, job.done)) {
            job.stalls += 1;
            if job.stalls >= PRI_RETRY_LIMIT {
                return Err(record);
            }
        } else {
            job.stalls = 0;
        }
        job.last_request = Some((addr, job.done));
        let prgi = (0..PRG_INDEX_COUNT)
            .find(|i| exec.parked.iter().all(|p| p.prgi != *i))
            .ok_or(record)?;
        let req = PageRequestMessage {
            sid: self.config.sid,
            pasid: job.desc.pasid,
            addr: addr & !(PAGE_SIZE - 1),
            access,
            prgi,
            last: true,
        };
        exec.parked.push(Parked {
            job,
            prgi,
            addr,
            access,
            reason: fault.reason,
        });
        self.parked_changed(exec);
        bump(&self.counters.page_requests, 1);
        tracing::debug!(
            sid = %req.sid,
            pasid = ?req.pasid,
            addr = format_args!("{:#x}", req.addr),
            access = %req.access,
            prgi = req.prgi,
            "dma: page request"
        );
        self.port.page_request(req);
        Ok(())
    }

    fn on_response(&self, exec: &mut Exec, ctrl: u64, resp: PrgResponse) {
        bump(&self.counters.page_responses, 1);
        let found = exec
            .parked
            .iter()
            .position(|p| p.prgi == resp.prgi && p.job.desc.pasid == resp.pasid);
        let Some(i) = found else {
            self.status.fetch_or(STATUS_PRI_UPRGI, Ordering::AcqRel);
            return;
        };
        let parked = exec.parked.swap_remove(i);
        self.parked_changed(exec);
        let job = parked.job;
        if resp.code == ResponseCode::Success {
            self.run(exec, ctrl, job);
        } else {
            if resp.code == ResponseCode::ResponseFailure {
                self.status.fetch_or(STATUS_PRI_RF, Ordering::AcqRel);
            }
            match job.stage {
                Stage::Execute => {
                    let mut record = CompletionRecord::new(CompletionStatus::PageResponseError);
                    record.fault_write = parked.access.write;
                    record.fault_reason = parked.reason;
                    record.fault_addr = parked.addr;
                    record.bytes_completed = job.done as u32;
                    record.result = u8::from(is_descending(&job.desc.op));
                    self.finish(exec, ctrl, job, record);
                }
                Stage::Complete(_) => {
                    self.completion_failed(exec, job, CompletionStatus::CompletionAddrTranslation)
                }
            }
        }
        self.release_drains(exec, ctrl);
    }

    /// Completes the drains that no longer wait for an earlier parked descriptor.
    fn release_drains(&self, exec: &mut Exec, ctrl: u64) {
        if exec.drains.is_empty() {
            return;
        }
        let oldest_parked = exec.parked.iter().map(|p| p.job.seq).min();
        let ready: Vec<Job> = {
            let (ready, waiting) = std::mem::take(&mut exec.drains)
                .into_iter()
                .partition(|d| oldest_parked.is_none_or(|o| d.seq < o));
            exec.drains = waiting;
            ready
        };
        for d in ready {
            self.finish(
                exec,
                ctrl,
                d,
                CompletionRecord::new(CompletionStatus::Success),
            );
        }
    }

    /// The operation is over with `record`: counts it and writes the record if asked.
    fn finish(&self, exec: &mut Exec, ctrl: u64, mut job: Job, record: CompletionRecord) {
        let success = record.status == CompletionStatus::Success;
        let write = match job.desc.completion {
            CompletionRequest::Always(_) => true,
            CompletionRequest::OnError(_) => !success,
            CompletionRequest::None => false,
        };
        if write {
            job.stage = Stage::Complete(record);
            job.last_request = None;
            job.stalls = 0;
            self.write_completion(exec, ctrl, job, record);
            return;
        }
        self.completed(exec, success);
        if !success {
            self.record_software_error(SoftwareError {
                status: record.status,
                opcode: job.opcode,
                pasid: job.desc.pasid,
                addr: record.fault_addr,
            });
        }
    }

    /// Writes the completion record by DMA in the descriptor's address space, status byte
    /// last, so that software polling the status sees a whole record.
    fn write_completion(&self, exec: &mut Exec, ctrl: u64, job: Job, record: CompletionRecord) {
        let Some(addr) = job.desc.completion.addr() else {
            return;
        };
        let access = DmaAccess::WRITE.with_privileged(job.desc.privileged);
        let bytes = record.to_bytes();
        let mut epoch = Epoch::new(self.drain(ctrl));
        let written = loop {
            let mut cursor = None;
            let len = COMPLETION_RECORD_SIZE as u64;
            let t = match self.translate(&mut cursor, ctrl, job.desc.pasid, addr, access, len) {
                Ok(t) => t,
                Err(stop) => break Err(stop),
            };
            let _in_flight = match epoch.enter(&self.counters, &mut [&mut cursor], addr, access) {
                Ok(Some(guard)) => guard,
                Ok(None) => continue,
                Err(stop) => break Err(stop),
            };
            let hpa = t.hpa_of(addr);
            break self
                .write_hpa(ctrl, hpa.checked_add(1), &bytes[1..], addr + 1, access)
                .and_then(|()| self.write_hpa(ctrl, Some(hpa), &bytes[..1], addr, access));
        };
        match written {
            Ok(()) => self.completed(exec, record.status == CompletionStatus::Success),
            Err(Stop::Fault {
                addr: at,
                access,
                fault,
            }) if fault.recoverable => {
                if self
                    .request_page(exec, ctrl, job, at, access, fault)
                    .is_err()
                {
                    self.completion_failed(exec, job, CompletionStatus::CompletionAddrTranslation);
                }
            }
            Err(Stop::Fault { .. }) => {
                self.completion_failed(exec, job, CompletionStatus::CompletionAddrTranslation)
            }
            Err(Stop::Memory { .. }) => {
                self.completion_failed(exec, job, CompletionStatus::AccessError)
            }
        }
    }

    /// The record could not be written: the error goes to the software error register.
    fn completion_failed(&self, exec: &mut Exec, job: Job, status: CompletionStatus) {
        self.completed(exec, false);
        self.record_software_error(SoftwareError {
            status,
            opcode: job.opcode,
            pasid: job.desc.pasid,
            addr: job.desc.completion.addr().unwrap_or(0),
        });
    }

    /// The translation of `addr` for `access`, reusing `cursor` while `addr` stays in its
    /// run. Without ATS the IOMMU answers for the run of pages that continue it in host
    /// memory over the `len` bytes from `addr` the operation still moves
    /// ([`DmaPort::remap_run`]); with ATS, for the page (the device TLB caches pages).
    fn translate(
        &self,
        cursor: &mut Cursor,
        ctrl: u64,
        pasid: Option<Pasid>,
        addr: u64,
        access: DmaAccess,
        len: u64,
    ) -> Result<DmaRun, Stop> {
        if let Some(run) = *cursor {
            if run.contains(addr) {
                return Ok(run);
            }
        }
        let fault = |fault| Stop::Fault {
            addr,
            access,
            fault,
        };
        let sid = self.config.sid;
        let run = if ctrl & CTRL_ATS_EN != 0 {
            // A miss takes its fill token under the lock of its lookup.
            let cached = {
                let tlb = self.devtlb.lock().unwrap_or_else(PoisonError::into_inner);
                tlb.lookup(pasid, addr, access)
                    .ok_or_else(|| tlb.begin_fill())
            };
            let t = match cached {
                Ok(t) => {
                    bump(&self.counters.devtlb_hits, 1);
                    t
                }
                Err(fill) => {
                    bump(&self.counters.devtlb_misses, 1);
                    self.ats_fill(fill, pasid, addr, access).map_err(fault)?
                }
            };
            DmaRun::page(t, addr)
        } else {
            bump(&self.counters.translations, 1);
            self.port
                .remap_run(sid, pasid, addr, access, len)
                .map_err(fault)?
        };
        *cursor = Some(run);
        Ok(run)
    }

    /// Sends translation requests for `addr` until one completes with no invalidate
    /// request arriving since its fill token (`fill` for the first, from the lookup that
    /// missed), caches it and returns what it grants `access`. A completion an
    /// invalidation overtook may predate it and is neither cached nor used (see
    /// [`DevTlb`]); after [`ATS_RETRY_LIMIT`] such completions in a row the request fails
    /// instead of waiting for the invalidations to stop.
    fn ats_fill(
        &self,
        mut fill: u64,
        pasid: Option<Pasid>,
        addr: u64,
        access: DmaAccess,
    ) -> Result<DmaTranslation, DmaFault> {
        // A completion that does not grant the access is a translation failure.
        let refused = DmaFault {
            reason: 0,
            recoverable: false,
        };
        for _ in 0..ATS_RETRY_LIMIT {
            let c = self
                .port
                .ats_translate(self.config.sid, pasid, addr, access)?;
            {
                let mut tlb = self.devtlb.lock().unwrap_or_else(PoisonError::into_inner);
                if tlb.insert(fill, pasid, addr, c) {
                    // What a lookup of the entry just made would answer.
                    return c.grants(access).then_some(c.page).ok_or(refused);
                }
                // The next request's token, taken before it is sent.
                fill = tlb.begin_fill();
            }
            bump(&self.counters.ats_overtaken, 1);
        }
        Err(refused)
    }

    /// Checks a translated request with the IOMMU when ATS is in use.
    fn check_translated(
        &self,
        ctrl: u64,
        hpa: Hpa,
        len: usize,
        dev_addr: u64,
        access: DmaAccess,
    ) -> Result<(), Stop> {
        if ctrl & CTRL_ATS_EN == 0 {
            return Ok(());
        }
        self.port
            .check_translated(self.config.sid, hpa, len as u64, access)
            .map_err(|fault| Stop::Fault {
                addr: dev_addr,
                access,
                fault,
            })
    }

    /// Checks one memory request of a memmove before the run it joins is moved: with ATS
    /// the IOMMU checks it as a translated request, and its bytes must lie in host memory.
    fn check_request(
        &self,
        ctrl: u64,
        hpa: Hpa,
        len: u64,
        dev_addr: u64,
        access: DmaAccess,
    ) -> Result<(), Stop> {
        self.check_translated(ctrl, hpa, len as usize, dev_addr, access)?;
        let in_memory = hpa
            .0
            .checked_add(len)
            .is_some_and(|end| end <= self.port.memory().size());
        if in_memory {
            Ok(())
        } else {
            Err(Stop::Memory {
                addr: dev_addr,
                write: access.write,
            })
        }
    }

    /// Moves a run of a memmove, HPA to HPA, in flight in `epoch`, and counts its bytes
    /// done; `false` when its translations may be stale and nothing moved (see
    /// [`Epoch::enter`]). Every request of the run was checked against host memory, so the
    /// copy does not fail; should it, the descriptor stops with an access error at the
    /// run's destination, none of its bytes counted.
    fn move_run(
        &self,
        epoch: &mut Epoch<'_>,
        cursors: [&mut Cursor; 2],
        run: Run,
        job: &mut Job,
    ) -> Result<bool, Stop> {
        let mut cursors = cursors;
        let Some(_in_flight) =
            epoch.enter(&self.counters, &mut cursors, run.dst, DmaAccess::WRITE)?
        else {
            return Ok(false);
        };
        self.port
            .memory()
            .copy(run.src_hpa, run.dst_hpa, run.len)
            .map_err(|_| Stop::Memory {
                addr: run.dst,
                write: true,
            })?;
        job.done += run.len;
        bump(&self.counters.bytes_moved, run.len);
        bump(&self.counters.memmove_runs, 1);
        Ok(true)
    }

    /// The drain the translations of requests complete their invalidations through: with
    /// ATS the device TLB's own (an invalidate request completes once no request uses a
    /// dropped entry), otherwise the IOMMU's.
    fn drain(&self, ctrl: u64) -> &RequestDrain {
        if ctrl & CTRL_ATS_EN != 0 {
            &self.devtlb_drain
        } else {
            self.port.request_drain()
        }
    }

    fn read_hpa(
        &self,
        ctrl: u64,
        hpa: Hpa,
        buf: &mut [u8],
        dev_addr: u64,
        access: DmaAccess,
    ) -> Result<(), Stop> {
        self.check_translated(ctrl, hpa, buf.len(), dev_addr, access)?;
        self.port
            .memory()
            .read(hpa.0, buf)
            .map_err(|_| Stop::Memory {
                addr: dev_addr,
                write: false,
            })
    }

    fn write_hpa(
        &self,
        ctrl: u64,
        hpa: Option<Hpa>,
        buf: &[u8],
        dev_addr: u64,
        access: DmaAccess,
    ) -> Result<(), Stop> {
        let err = Stop::Memory {
            addr: dev_addr,
            write: true,
        };
        let hpa = hpa.ok_or(err)?;
        self.check_translated(ctrl, hpa, buf.len(), dev_addr, access)?;
        self.port.memory().write(hpa.0, buf).map_err(|_| err)
    }

    /// Runs the operation from `job.done` on; returns the record's result byte.
    fn execute(&self, bounce: &mut Bounce, ctrl: u64, job: &mut Job) -> Result<u8, Stop> {
        let pasid = job.desc.pasid;
        let read = DmaAccess::READ.with_privileged(job.desc.privileged);
        let write = DmaAccess::WRITE.with_privileged(job.desc.privileged);
        let (mut c1, mut c2): (Cursor, Cursor) = (None, None);
        let mut epoch = Epoch::new(self.drain(ctrl));
        match job.desc.op {
            Operation::Nop | Operation::Drain => Ok(0),
            Operation::Memmove { src, dst, size } => {
                let size = u64::from(size);
                let descending = is_descending(&job.desc.op);
                let mut run: Option<Run> = None;
                let stop = loop {
                    let left = size - job.done - run.map_or(0, |r| r.len);
                    let next = (left > 0).then(|| {
                        // Ascending: the next bytes from the bottom; descending: from the
                        // top.
                        let at = if descending {
                            [src + left - 1, dst + left - 1]
                        } else {
                            [src + size - left, dst + size - left]
                        };
                        self.memmove_request(
                            ctrl,
                            pasid,
                            [&mut c1, &mut c2],
                            at,
                            [read, write],
                            left,
                            descending,
                        )
                    });
                    if let Some(Ok(piece)) = next {
                        if run.as_mut().is_some_and(|r| r.join(piece, descending)) {
                            continue;
                        }
                    }
                    // The run ends here: its bytes move before the next request's.
                    if let Some(r) = run.take() {
                        if !self.move_run(&mut epoch, [&mut c1, &mut c2], r, job)? {
                            continue;
                        }
                    }
                    match next {
                        None => break None,
                        Some(Err(stop)) => break Some(stop),
                        Some(Ok(piece)) => run = Some(piece),
                    }
                };
                stop.map_or(Ok(0), Err)
            }
            Operation::Fill { pattern, dst, size } => {
                let size = u64::from(size);
                while job.done < size {
                    let d = dst + job.done;
                    let td = self.translate(&mut c2, ctrl, pasid, d, write, size - job.done)?;
                    let n = (size - job.done).min(td.bytes_from(d)).min(REQUEST);
                    // Byte `i` of the chunk is byte `(done + i) % 8` of the pattern: the
                    // pattern turned to the chunk's phase.
                    let phase = (job.done % 8) as u32;
                    let chunk = bounce.fill(pattern.rotate_right(8 * phase), n as usize);
                    let Some(_in_flight) = epoch.enter(&self.counters, &mut [&mut c2], d, write)?
                    else {
                        continue;
                    };
                    self.write_hpa(ctrl, Some(td.hpa_of(d)), chunk, d, write)?;
                    job.done += n;
                    bump(&self.counters.bytes_moved, n);
                }
                Ok(0)
            }
            Operation::Compare { src1, src2, size } => {
                let size = u64::from(size);
                let (b1, b2) = bounce.both();
                while job.done < size {
                    let (a1, a2) = (src1 + job.done, src2 + job.done);
                    let left = size - job.done;
                    let t1 = self.translate(&mut c1, ctrl, pasid, a1, read, left)?;
                    let t2 = self.translate(&mut c2, ctrl, pasid, a2, read, left)?;
                    let n = left
                        .min(t1.bytes_from(a1))
                        .min(t2.bytes_from(a2))
                        .min(REQUEST) as usize;
                    let cursors = &mut [&mut c1, &mut c2];
                    let Some(in_flight) = epoch.enter(&self.counters, cursors, a1, read)? else {
                        continue;
                    };
                    self.read_hpa(ctrl, t1.hpa_of(a1), &mut b1[..n], a1, read)?;
                    self.read_hpa(ctrl, t2.hpa_of(a2), &mut b2[..n], a2, read)?;
                    drop(in_flight);
                    let differ = b1[..n].iter().zip(&b2[..n]).position(|(x, y)| x != y);
                    let same = differ.unwrap_or(n);
                    job.done += same as u64;
                    bump(&self.counters.bytes_compared, same as u64);
                    if differ.is_some() {
                        return Ok(1);
                    }
                }
                Ok(0)
            }
        }
    }

    /// The next requests of a memmove with `left` bytes to go, after the bytes a pending
    /// run holds: translates both operands at `at` (source, destination: their lowest
    /// bytes to go, or with `descending` their highest), checks the requests with the IOMMU
    /// and host memory, and returns them as a run of their own.
    ///
    /// Ascending, the run is every request up to the end of either operand's translated
    /// run: its pages were each translated and checked for the access by the IOMMU
    /// ([`DmaPort::remap_run`]), and a translated request's check does not depend on where
    /// in host memory it goes but for the range, so one check of the run's bytes in each
    /// operand stands for the check of each request. When a run leaves host memory it ends
    /// before the first request that does, which is then checked alone and fails at its
    /// own address, as it would have request by request. Descending, a run is one request.
    #[allow(clippy::too_many_arguments)]
    fn memmove_request(
        &self,
        ctrl: u64,
        pasid: Option<Pasid>,
        cursors: [&mut Cursor; 2],
        at: [u64; 2],
        access: [DmaAccess; 2],
        left: u64,
        descending: bool,
    ) -> Result<Run, Stop> {
        let [c1, c2] = cursors;
        let [s, d] = at;
        let [read, write] = access;
        // Runs are looked up upwards: a descending copy asks for its page only.
        let ahead = if descending { 1 } else { left };
        let ts = self.translate(c1, ctrl, pasid, s, read, ahead)?;
        let td = self.translate(c2, ctrl, pasid, d, write, ahead)?;
        let piece = if descending {
            let room = |t: DmaRun, a: u64| a - t.start() + 1;
            let n = left.min(room(ts, s)).min(room(td, d)).min(REQUEST);
            let (s, d) = (s + 1 - n, d + 1 - n);
            Run {
                dst: d,
                src_hpa: ts.hpa_of(s),
                dst_hpa: td.hpa_of(d),
                len: n,
            }
        } else {
            let n = left.min(ts.bytes_from(s)).min(td.bytes_from(d));
            let (src_hpa, dst_hpa) = (ts.hpa_of(s), td.hpa_of(d));
            // The whole requests from `hpa` on that lie in host memory, up to `n` bytes.
            let size = self.port.memory().size();
            let in_memory = |hpa: Hpa| match hpa.0.checked_add(n) {
                Some(end) if end <= size => n,
                _ => size.saturating_sub(hpa.0) / REQUEST * REQUEST,
            };
            let n = match in_memory(src_hpa).min(in_memory(dst_hpa)) {
                0 => n.min(REQUEST),
                whole => whole,
            };
            Run {
                dst: d,
                src_hpa,
                dst_hpa,
                len: n,
            }
        };
        let s = if descending { s + 1 - piece.len } else { s };
        self.check_request(ctrl, piece.src_hpa, piece.len, s, read)?;
        self.check_request(ctrl, piece.dst_hpa, piece.len, piece.dst, write)?;
        Ok(piece)
    }
}

/// Whether a memmove must copy from the top down: the destination overlaps the source
/// from above.
fn is_descending(op: &Operation) -> bool {
    match *op {
        Operation::Memmove { src, dst, size } => dst > src && dst - src < u64::from(size),
        _ => false,
    }
}

/// The record of an operation stopped by `stop` after `done` bytes.
fn stop_record(stop: Stop, done: u64) -> CompletionRecord {
    let mut record;
    match stop {
        Stop::Fault {
            addr,
            access,
            fault,
        } => {
            record = CompletionRecord::new(if fault.recoverable {
                CompletionStatus::PageFault
            } else {
                CompletionStatus::TranslationFail
            });
            record.fault_write = access.write;
            record.fault_reason = fault.reason;
            record.fault_addr = addr;
        }
        Stop::Memory { addr, write } => {
            record = CompletionRecord::new(CompletionStatus::AccessError);
            record.fault_write = write;
            record.fault_addr = addr;
        }
    }
    record.bytes_completed = done as u32;
    record
}

impl AtsEndpoint for DmaEngine {
    fn source_id(&self) -> vsva_vtd::addr::SourceId {
        self.config.sid
    }

    fn pcie_capabilities(&self) -> PcieCapabilities {
        self.config.pcie_capabilities()
    }

    /// Drops the entries, then completes once no request that may have used one is
    /// moving bytes (the device TLB's [`RequestDrain`]). The lock serialises the drains.
    fn invalidate_devtlb(&self, inv: DevTlbInvalidation) -> usize {
        self.invalidate_devtlb_each(&[inv])
    }

    /// One lock, one pass over the entries and one drain for all of `invs`.
    fn invalidate_devtlb_each(&self, invs: &[DevTlbInvalidation]) -> usize {
        let mut tlb = self.devtlb.lock().unwrap_or_else(PoisonError::into_inner);
        bump(&self.counters.devtlb_invalidations, invs.len() as u64);
        let dropped = tlb.invalidate_each(invs);
        self.devtlb_drain.drain();
        dropped
    }

    fn page_response(&self, resp: PrgResponse) {
        self.wq
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .responses
            .push(resp);
    }
}

/// Completion records are 32 bytes: the record write above relies on it not crossing a
/// page, which 32-byte alignment guarantees.
const _: () = assert!(COMPLETION_RECORD_SIZE == 32 && PAGE_SIZE % 32 == 0);
