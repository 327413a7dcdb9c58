//! The physical Arm SMMUv3 model (IHI 0070).
//!
//! Its registers are `vsva_smmuv3`'s [`RegisterFile`]; the stream table, context
//! descriptors, translation tables and the three queues live in host memory. The model
//! caches what it reads as hardware does: STEs per StreamID and CDs per (StreamID,
//! SubstreamID) in a configuration cache, leaf translations in a TLB tagged by VMID and
//! ASID (global, nG = 0, stage-1 entries by VMID alone), stage-1 table descriptors in a
//! walk cache tagged by VMID and ASID, and stage-2 table descriptors in a walk cache tagged
//! by VMID, which every stage-2 walk of a nested stream uses: its L1CD and CD fetches', its
//! stage-1 tables' and its output's. A cached entry stays until exactly the command that
//! removes it; strict mode re-walks on every hit and reports stale entries with the command
//! that was missing. Devices reach it as a [`DmaPort`](crate::dma::port::DmaPort): their
//! requester id is the StreamID and their PASID the SubstreamID.
//!
//! A translation's walk and its TLB and walk-cache fills run under the one state lock that
//! every invalidation command also takes, so no TLBI or CFGI can overtake a fill (the VT-d
//! model walks without a lock and refuses such fills by a generation; its strict mode
//! records them): there is never a refused fill for strict mode to report here. What a
//! CMD_SYNC still has to cover, translations already handed to devices, it drains
//! ([`RequestDrain`]). The test `translations_after_cmd_sync_never_give_a_frame_a_tlbi_removed`
//! races translations against TLBI + CMD_SYNC with real threads.
//!
//! Interrupts are MSIs (§7.5): the event queue's, the PRI queue's and GERROR's, sent when
//! IRQ_CTRL enables them, and CMD_SYNC's with CS = SIG_IRQ. An MSI to the platform's doorbell
//! ([`Smmu::set_msi_doorbell`]) reaches its handler; any other is a memory write, and one that
//! aborts activates its GERROR.MSI_*_ABT_ERR, as an aborted queue write activates
//! EVENTQ_ABT_ERR or PRIQ_ABT_ERR.
//!
//! Faults terminate the transaction, or under the stall model (IDR0.STALL_MODEL 0 or 2, CD.S,
//! STE.S2S) hold it until CMD_RESUME or CMD_STALL_TERM (`stall`): a stalled untranslated
//! request waits in [`Smmu::translate`] without the state lock. ATS translation requests
//! never stall (PCIe completes them at once).
//!
//! Simplifications: level-1 descriptors (L1STD, L1CD) are not cached, so CMD_CFGI_* Leaf
//! makes no difference; stage-2 faults of CD fetches and external aborts terminate.

mod cmdq;
pub mod config;
mod explain;
mod port;
mod queues;
mod s2walk;
mod stale;
mod stall;
#[cfg(test)]
mod tests;
pub mod tlb;
mod translate;
pub mod walkcache;

use crate::drain::RequestDrain;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use vsva_smmuv3::regs::{cr0, offset, Irq};
use vsva_smmuv3::{features::Features, regs::RegEffect, regs::RegError, regs::RegisterFile};

use crate::dma::port::AtsEndpoint;
use crate::memory::HostMemory;
use config::ConfigCache;
use stall::StallTable;
use tlb::Tlb;
use walkcache::{S1WalkCache, S2WalkCache};

pub use queues::PriRefused;
pub use stale::{StaleKind, StaleTranslation};
pub use translate::{SmmuFault, SmmuTranslation};

/// What the model implements.
#[derive(Clone, Copy, Debug)]
pub struct SmmuConfig {
    /// The ID registers' features.
    pub features: Features,
    /// log2 of the largest command, event and PRI queues.
    pub queue_log2: [u8; 3],
    /// Re-walk on every TLB and configuration cache hit and report stale entries.
    pub strict: bool,
    /// Most transactions stalled at once; a stalling fault beyond it terminates.
    pub stall_limit: usize,
    /// How long a stalled transaction waits for CMD_RESUME or CMD_STALL_TERM before the
    /// model terminates it (a guard against software that went away).
    pub stall_timeout: Duration,
}

impl Default for SmmuConfig {
    /// vsva's SMMU ([`Features::VSVA`]) with queues of up to 2^8 entries, up to 64
    /// stalled transactions, each waiting at most 60 s.
    fn default() -> Self {
        SmmuConfig {
            features: Features::VSVA,
            queue_log2: [8, 8, 8],
            strict: false,
            stall_limit: 64,
            stall_timeout: Duration::from_secs(60),
        }
    }
}

/// Counters of the model's work.
#[derive(Debug, Default)]
pub struct SmmuStats {
    /// Table walks done after TLB misses.
    pub walks: AtomicU64,
    /// Commands executed.
    pub commands: AtomicU64,
    /// Events written to the event queue.
    pub events: AtomicU64,
    /// Events lost because the event queue was full or disabled.
    pub events_lost: AtomicU64,
    /// Page requests written to the PRI queue.
    pub page_requests: AtomicU64,
    /// Transactions stalled (their fault recorded with Stall = 1).
    pub stalls: AtomicU64,
    /// Stalling faults terminated instead: the stall limit was reached or the stall
    /// record could not be written.
    pub stalls_refused: AtomicU64,
    /// Stalled transactions that CMD_RESUME Retry translated again.
    pub stalls_retried: AtomicU64,
    /// Stalled transactions terminated (by command, STE change, SMMUEN cleared or timeout).
    pub stalls_terminated: AtomicU64,
}

/// The state one lock guards.
struct State {
    regs: RegisterFile,
    config: ConfigCache,
    tlb: Tlb,
    walk_cache: S1WalkCache,
    s2_walk_cache: S2WalkCache,
    stale: Vec<StaleTranslation>,
    stalls: StallTable,
}

/// The physical SMMUv3.
pub struct Smmu {
    mem: Arc<HostMemory>,
    features: Features,
    strict: bool,
    stall_limit: usize,
    stall_timeout: Duration,
    state: Mutex<State>,
    /// Held while one thread consumes the command queue.
    cmdq_lock: Mutex<()>,
    endpoints: Mutex<HashMap<u32, Arc<dyn AtsEndpoint>>>,
    stats: SmmuStats,
    /// What CMD_SYNC completes through (see [`RequestDrain`]).
    drain: RequestDrain,
    /// The MSI controller's doorbell address and what it does with an MSI's data.
    doorbell: Mutex<Option<(u64, MsiHandler)>>,
}

/// What the platform's MSI controller does with an MSI's data (see
/// [`Smmu::set_msi_doorbell`]).
pub type MsiHandler = Arc<dyn Fn(u32) + Send + Sync>;

impl fmt::Debug for Smmu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Smmu")
            .field("features", &self.features)
            .field("strict", &self.strict)
            .finish_non_exhaustive()
    }
}

impl Smmu {
    /// An SMMU in its reset state (everything disabled, GBPA aborting) over `mem`.
    pub fn new(mem: Arc<HostMemory>, cfg: SmmuConfig) -> Self {
        Smmu {
            mem,
            features: cfg.features,
            strict: cfg.strict,
            stall_limit: cfg.stall_limit,
            stall_timeout: cfg.stall_timeout,
            state: Mutex::new(State {
                regs: RegisterFile::new(cfg.features, cfg.queue_log2),
                config: ConfigCache::default(),
                tlb: Tlb::default(),
                walk_cache: S1WalkCache::default(),
                s2_walk_cache: S2WalkCache::default(),
                stale: Vec::new(),
                stalls: StallTable::default(),
            }),
            cmdq_lock: Mutex::new(()),
            endpoints: Mutex::new(HashMap::new()),
            stats: SmmuStats::default(),
            drain: RequestDrain::new(),
            doorbell: Mutex::new(None),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The features the ID registers report.
    pub fn features(&self) -> &Features {
        &self.features
    }

    /// The counters.
    pub fn stats(&self) -> &SmmuStats {
        &self.stats
    }

    /// Connects the device with StreamID `sid`: CMD_ATC_INV reaches it as an ATS invalidate
    /// request and CMD_PRI_RESP as a PRG response message.
    pub fn attach_endpoint(&self, sid: u32, endpoint: Arc<dyn AtsEndpoint>) {
        self.endpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(sid, endpoint);
    }

    /// Disconnects the device with StreamID `sid`.
    pub fn detach_endpoint(&self, sid: u32) {
        self.endpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&sid);
    }

    fn endpoint(&self, sid: u32) -> Option<Arc<dyn AtsEndpoint>> {
        self.endpoints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&sid)
            .cloned()
    }

    /// A software read of `size` bytes at `offset` of the register page.
    pub fn mmio_read(&self, offset: u64, size: usize) -> Result<u64, RegError> {
        self.lock().regs.read(offset, size)
    }

    /// A software write of `size` bytes at `offset`: a CMDQ_PROD write consumes the
    /// commands it produced before returning.
    pub fn mmio_write(&self, offset: u64, size: usize, value: u64) -> Result<(), RegError> {
        let effect = {
            let mut state = self.lock();
            let effect = state.regs.write(offset, size, value)?;
            if let RegEffect::Cr0 { old, new } = effect {
                if old & cr0::SMMUEN != 0 && new & cr0::SMMUEN == 0 {
                    // Translation is off: no stalled transaction can be resumed.
                    let n = state.stalls.terminate_where(|_| true);
                    self.count_n(&self.stats.stalls_terminated, n);
                }
            }
            effect
        };
        match effect {
            RegEffect::CmdqProd => self.consume_commands(),
            // Enabling the command queue, or acknowledging CMDQ_ERR, resumes consumption
            // of commands already produced.
            RegEffect::Cr0 { old, new } if old & cr0::CMDQEN == 0 && new & cr0::CMDQEN != 0 => {
                self.consume_commands()
            }
            _ if offset == offset::GERRORN => self.consume_commands(),
            _ => {}
        }
        Ok(())
    }

    /// Takes the stale translations strict mode found since the last call.
    pub fn take_stale(&self) -> Vec<StaleTranslation> {
        std::mem::take(&mut self.lock().stale)
    }

    /// Number of TLB entries and configuration cache entries (STEs, CDs).
    pub fn cached_entries(&self) -> (usize, usize, usize) {
        let s = self.lock();
        (s.tlb.len(), s.config.stes(), s.config.cds())
    }

    /// Number of TLB entries tagged with `vmid`.
    pub fn tlb_entries_of(&self, vmid: u16) -> usize {
        self.lock().tlb.len_of_vmid(vmid)
    }

    /// Whether strict mode checks every cached translation.
    pub fn strict(&self) -> bool {
        self.strict
    }

    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn count_n(&self, counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Number of transactions stalled now, of every stream or of `sid`'s.
    pub fn stalled(&self, sid: Option<u32>) -> usize {
        let s = self.lock();
        sid.map_or(s.stalls.len(), |sid| s.stalls.of_stream(sid))
    }

    /// Connects the platform's MSI controller: an MSI whose address is `addr` (a GICv3
    /// ITS's GITS_TRANSLATER, say) is delivered to `handler` with its data instead of
    /// being written to memory. The handler runs on the thread that raised the interrupt,
    /// with the SMMU's state locked: it may only take note (wake a thread, signal an
    /// eventfd), never call back into the SMMU.
    pub fn set_msi_doorbell(&self, addr: u64, handler: MsiHandler) {
        *self.doorbell.lock().unwrap_or_else(|e| e.into_inner()) = Some((addr, handler));
    }

    /// Disconnects the MSI controller: MSIs are memory writes again.
    pub fn clear_msi_doorbell(&self) {
        *self.doorbell.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Sends `irq`'s MSI when the interrupt is enabled in IRQ_CTRL and has an address. An
    /// MSI write that aborts activates its GERROR.MSI_*_ABT_ERR, and for the event and PRI
    /// queues' interrupts signals GERROR in turn (§7.5).
    fn signal(&self, regs: &mut RegisterFile, irq: Irq) {
        use vsva_smmuv3::regs::{gerror, irq_ctrl};
        let (enable, abort) = match irq {
            Irq::Gerror => (irq_ctrl::GERROR_IRQEN, gerror::MSI_GERROR_ABT_ERR),
            Irq::Eventq => (irq_ctrl::EVENTQ_IRQEN, gerror::MSI_EVENTQ_ABT_ERR),
            Irq::Priq => (irq_ctrl::PRIQ_IRQEN, gerror::MSI_PRIQ_ABT_ERR),
        };
        let irq_ctrl = regs.read(offset::IRQ_CTRL, 4).unwrap_or(0) as u32;
        let msi = regs.msi(irq);
        if irq_ctrl & enable == 0 || msi.addr == 0 || self.msi_write(msi.addr, msi.data) {
            return;
        }
        self.raise_gerror(regs, abort);
    }

    /// Activates the global error `bit` and signals GERROR's interrupt, unless the bit was
    /// active already or is the abort of GERROR's own MSI.
    fn raise_gerror(&self, regs: &mut RegisterFile, bit: u32) {
        if regs.activate_gerror(bit) && bit != vsva_smmuv3::regs::gerror::MSI_GERROR_ABT_ERR {
            self.signal(regs, Irq::Gerror);
        }
    }

    /// One MSI write: to the doorbell's handler, or to memory. False when it aborted.
    fn msi_write(&self, addr: u64, data: u32) -> bool {
        use vsva_mem::PhysMem;
        let doorbell = self
            .doorbell
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some((bell, handler)) = doorbell {
            if bell == addr {
                handler(data);
                return true;
            }
        }
        match self.mem.write(addr, &data.to_le_bytes()) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(addr, %e, "SMMU MSI write aborted");
                false
            }
        }
    }
}
