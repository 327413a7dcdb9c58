//! The vIOMMU: a VT-d remapping unit the guest programs through registers (VT-d §10.4) and
//! tables and queues in its own RAM.
//!
//! Register accesses go to the shared [`RegisterFile`]; what a write sets in motion (the
//! invalidation queue, register-based invalidations, virtual commands) is carried out
//! before the write returns, so by the time the guest sees an invalidation wait complete,
//! every host call of the descriptors before it has returned. Interrupts are delivered
//! after the vIOMMU's locks are released, so a handler may access the registers.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use vsva_mem::MemError;
use vsva_mem::PhysMem;

use vsva_uapi::error::Errno;
use vsva_vtd::inv_desc::{ContextCacheGranularity, PasidCacheGranularity, ResponseCode};
use vsva_vtd::invalidation::{self, Completion, InvalidationUnit, IotlbInvalidation};
use vsva_vtd::regs::layout::offset;
use vsva_vtd::regs::{Interrupt, Iqei, RegEffect, RegEffects, Ttm, VcmdResponse, VirtualCommand};
use vsva_vtd::{
    addr::DomainId, addr::Pasid, addr::SourceId, flpte::FlFormat, inv_desc::InvDesc,
    regs::RegisterFile, regs::RegisterGuard, regs::SharedRegisterFile, request::RootState,
    root::EntryChecks,
};

use crate::caches::{Caches, IotlbScope};
use crate::config::{VIommuConfig, PASID_BITS};
use crate::error::{HostCall, HostCallError, VIommuError};
use crate::host::PasidSource;
use crate::shadow::{InclusiveFlushes, Passthrough, SyncPass};
use crate::space::Spaces;
use crate::stats::{Counters, VIommuStats};

/// Receives the interrupt messages the vIOMMU raises (fault, invalidation completion and
/// page request events): the VMM's MSI delivery into the guest.
pub type InterruptHandler = Arc<dyn Fn(Interrupt) + Send + Sync>;

/// Guest RAM as the vIOMMU reads and writes it, by guest physical address (for example
/// the VM's `GuestMemoryMmap`).
pub type GuestRam = Arc<dyn PhysMem + Send + Sync>;

/// How many failed host calls are kept for [`VIommu::take_host_errors`] (the most recent
/// ones; the counter counts all).
const HOST_ERRORS_KEPT: usize = 256;

/// Locks a mutex whose data stays consistent when a holder panicked (every update is
/// completed before the guard is dropped).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The guest-visible virtual VT-d of one VM.
pub struct VIommu {
    pub(crate) mem: GuestRam,
    pub(crate) config: VIommuConfig,
    /// The entry checks of the capabilities, for the context and PASID entries read.
    pub(crate) entry_checks: EntryChecks,
    pub(crate) fl_format: FlFormat,
    pub(crate) regs: SharedRegisterFile,
    /// The root word ([`RootState::word`]): one load on the translate path.
    pub(crate) root: AtomicU64,
    irq_handler: RwLock<Option<InterruptHandler>>,
    pasids: Arc<dyn PasidSource>,
    pub(crate) guest_pasids: Mutex<BTreeSet<Pasid>>,
    pub(crate) devices: Mutex<Vec<Passthrough>>,
    pub(crate) caches: Caches,
    pub(crate) spaces: Spaces<IotlbScope>,
    /// Serialises invalidation processing; holds the host IOTLB invalidations the last
    /// descriptor forwarded, and the shadow pass (reused, so a pass does not allocate).
    queue: Mutex<(InclusiveFlushes, SyncPass)>,
    pub(crate) counters: Counters,
    host_errors: Mutex<Vec<HostCallError>>,
}

impl fmt::Debug for VIommu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VIommu")
            .field("config", &self.config)
            .field("root", &self.root_state())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl VIommu {
    /// A vIOMMU over guest RAM `mem`, advertising `config`, taking guest PASIDs from
    /// `pasids` (the VM's VFIO container, or a private PASID space for a VM without one). Translation is off
    /// until the guest enables it.
    pub fn new(
        mem: GuestRam,
        config: VIommuConfig,
        pasids: Arc<dyn PasidSource>,
    ) -> Result<Arc<Self>, VIommuError> {
        let fl_format = config.fl_format()?;
        let regs = RegisterFile::new(config.cap(), config.ecap())?;
        Ok(Arc::new(VIommu {
            mem,
            config,
            entry_checks: EntryChecks::new(&config.capabilities()),
            fl_format,
            regs: SharedRegisterFile::new(regs),
            root: AtomicU64::new(0),
            irq_handler: RwLock::new(None),
            pasids,
            guest_pasids: Mutex::default(),
            devices: Mutex::default(),
            caches: Caches::default(),
            spaces: Spaces::default(),
            queue: Mutex::default(),
            counters: Counters::default(),
            host_errors: Mutex::default(),
        }))
    }

    /// What the vIOMMU advertises.
    pub fn config(&self) -> &VIommuConfig {
        &self.config
    }

    /// Size of the register page (the MMIO window the VMM maps for the guest).
    pub fn mmio_size(&self) -> u64 {
        self.regs.size()
    }

    /// Registers the receiver of the vIOMMU's interrupt messages.
    pub fn set_interrupt_handler(&self, handler: InterruptHandler) {
        *self
            .irq_handler
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(handler);
    }

    /// A guest read of `size` bytes (4 or 8) at `offset` in the register page.
    pub fn read(&self, offset: u64, size: usize) -> Result<u64, VIommuError> {
        Ok(self.regs.read(offset, size)?)
    }

    /// A guest write of `size` bytes (4 or 8) at `offset` in the register page, with
    /// everything the write sets in motion done before it returns.
    pub fn write(&self, offset: u64, size: usize, value: u64) -> Result<(), VIommuError> {
        // A tail write is how the guest submits (§6.5.2): the queue lock is taken first,
        // in the order a pass takes both, so that the pass it starts reads the queue
        // under this write's register lock instead of taking that lock again.
        let mut queue = (offset & !7 == offset::IQT).then(|| lock(&self.queue));
        let mut effects = RegEffects::new();
        let mut regs = self.regs.lock();
        let translating = regs.translation_enabled();
        regs.write(offset, size, value, &mut effects)?;
        self.latch_root(&regs);
        if regs.translation_enabled() != translating {
            // What the address spaces cached with translation off (or on) is not what
            // requests see now.
            self.spaces.invalidate(IotlbScope::All);
        }
        let mut irqs = Vec::new();
        if let (Some(queue), [RegEffect::ProcessInvalidationQueue]) = (&mut queue, &effects[..]) {
            let (flushed, pass) = &mut **queue;
            self.drain_queue(flushed, pass, regs, &mut irqs);
        } else {
            drop(regs);
            drop(queue);
            for &effect in &effects {
                self.apply(effect, &mut irqs);
            }
        }
        self.deliver(irqs);
        Ok(())
    }

    /// Makes the translation state follow GSTS.TES and the latched root table.
    fn latch_root(&self, regs: &RegisterFile) {
        self.root.store(RootState::word(regs), Ordering::Release);
    }

    pub(crate) fn root_state(&self) -> RootState {
        RootState::from_word(self.root.load(Ordering::Acquire))
    }

    /// The latched scalable-mode root table, whether or not translation is enabled: what
    /// the guest's tables are read from when they are shadowed.
    pub(crate) fn scalable_root(&self) -> Option<u64> {
        RootState::scalable_table(self.root.load(Ordering::Acquire))
    }

    fn apply(&self, effect: RegEffect, irqs: &mut Vec<Interrupt>) {
        match effect {
            RegEffect::ProcessInvalidationQueue => self.process_invalidation_queue(irqs),
            RegEffect::RegisterInvalidation(desc) => {
                // Register-based invalidations have no status write: nothing can fail.
                let (flushed, pass) = &mut *lock(&self.queue);
                pass.clear();
                let _ = self.execute(&desc, flushed, pass, irqs);
                self.flush_invalidations(pass);
            }
            RegEffect::VirtualCommand(cmd) => self.virtual_command(cmd),
            RegEffect::Interrupt(irq) => irqs.push(irq),
            RegEffect::RootTableSet(_)
            | RegEffect::TranslationEnabled(_)
            | RegEffect::QueuedInvalidationEnabled(_)
            | RegEffect::InterruptRemappingEnabled(_)
            | RegEffect::InterruptRemapTableSet(_)
            | RegEffect::WriteBufferFlush => {}
        }
    }

    /// Fetches and carries out descriptors from IQH up to IQT (§6.5.2); stops at an
    /// invalid one with the invalidation queue error set and IQH left on it.
    ///
    /// The descriptors queued when a pass starts (up to the IQT it sees) make one shadow
    /// [`SyncPass`], fetched in bulk ([`invalidation::drain`]) without the register lock;
    /// IQH then moves past those carried out, and if descriptors remain a new pass starts.
    /// The host invalidations a pass gathers go down together when it ends (or earlier:
    /// see [`SyncPass`]).
    fn process_invalidation_queue(&self, irqs: &mut Vec<Interrupt>) {
        let (flushed, pass) = &mut *lock(&self.queue);
        self.drain_queue(flushed, pass, self.regs.lock(), irqs);
    }

    /// [`Self::process_invalidation_queue`]'s passes, with the queue lock held (`flushed`
    /// and `pass` are its data) and the register lock taken after it.
    fn drain_queue<'v>(
        &'v self,
        flushed: &mut InclusiveFlushes,
        pass: &mut SyncPass,
        mut regs: RegisterGuard<'v>,
        irqs: &mut Vec<Interrupt>,
    ) {
        loop {
            let (Some(_), Some(queue)) = (regs.next_inv_desc(), regs.inv_queue()) else {
                return;
            };
            let scalable = regs.root_table().ttm == Ttm::Scalable;
            drop(regs);
            pass.clear();
            let (done, error) = invalidation::drain(&*self.mem, queue, scalable, |desc| {
                self.execute(desc, flushed, pass, irqs)
                    .map_err(|_| Iqei::FetchError)
            });
            self.flush_invalidations(pass);
            regs = self.regs.lock();
            // Moves less only if a register write meanwhile stopped the queue (IQE, QI
            // disabled): IQH then stays, as the error requires.
            regs.advance_iqh_by(done);
            if let Some(iqei) = error {
                irqs.extend(regs.set_iqe(iqei));
                return;
            }
        }
    }

    /// Carries out one invalidation descriptor; `flushed` holds the host IOTLB
    /// invalidations the previous descriptor other than a wait forwarded, and is left
    /// holding this one's; `pass` is the shadow pass the descriptor belongs to. Fails only
    /// when the status write of an invalidation wait does not reach guest RAM.
    fn execute(
        &self,
        desc: &InvDesc,
        flushed: &mut InclusiveFlushes,
        pass: &mut SyncPass,
        irqs: &mut Vec<Interrupt>,
    ) -> Result<(), MemError> {
        Counters::bump_queued(&self.counters.descriptors, pass);
        let forwards = matches!(
            desc,
            InvDesc::Iotlb { .. } | InvDesc::PasidIotlb { .. } | InvDesc::PasidDevIotlb { .. }
        );
        if !forwards && !matches!(desc, InvDesc::InvWait { .. }) {
            flushed.clear();
        }
        let unit = &mut Invalidated {
            viommu: self,
            pass,
            irqs,
        };
        let done = invalidation::execute(unit, desc)?;
        if forwards {
            self.forward_invalidation(desc, flushed, pass);
        }
        // A wait completes once every earlier descriptor, host calls included, has: the
        // queue is processed in order, the invalidations gathered went down before the
        // status write (`drain`), and each host call returns before the next.
        if done == Completion::WaitInterrupt {
            irqs.extend(self.regs.lock().set_iwc());
        }
        Ok(())
    }

    /// Answers a virtual command (§10.4.44): PASIDs come from the host set, so the guest's
    /// PASID is the host's.
    fn virtual_command(&self, cmd: VirtualCommand) {
        let response = match cmd {
            VirtualCommand::AllocPasid => {
                let result = self.pasids.pasid_alloc(1, (1 << PASID_BITS) - 1);
                match self.host_result(result, || HostCall::PasidAlloc) {
                    Some(pasid) => {
                        lock(&self.guest_pasids).insert(pasid);
                        VcmdResponse::Allocated(pasid)
                    }
                    None => VcmdResponse::NoPasidAvailable,
                }
            }
            VirtualCommand::FreePasid(Some(pasid)) if lock(&self.guest_pasids).contains(&pasid) => {
                self.unbind_everywhere(pasid);
                let result = self.pasids.pasid_free(pasid);
                match self.host_result(result, || HostCall::PasidFree(pasid)) {
                    Some(()) => {
                        lock(&self.guest_pasids).remove(&pasid);
                        VcmdResponse::Freed
                    }
                    None => VcmdResponse::InvalidPasid,
                }
            }
            VirtualCommand::FreePasid(_) => VcmdResponse::InvalidPasid,
            VirtualCommand::Unknown { .. } => VcmdResponse::InvalidCommand,
        };
        // The command was started by the write being handled; nothing else completes it.
        let _ = self.regs.lock().complete_virtual_command(response);
    }

    /// Unwraps a host call's result; a failure is counted and kept.
    pub(crate) fn host_result<T>(
        &self,
        result: Result<T, Errno>,
        call: impl FnOnce() -> HostCall,
    ) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(error) => {
                let e = HostCallError {
                    call: call(),
                    error,
                };
                tracing::warn!("vIOMMU: {e}");
                Counters::bump(&self.counters.host_errors);
                let mut kept = lock(&self.host_errors);
                if kept.len() == HOST_ERRORS_KEPT {
                    kept.remove(0);
                }
                kept.push(e);
                None
            }
        }
    }

    /// Delivers interrupt messages to the registered handler.
    pub(crate) fn deliver(&self, irqs: impl IntoIterator<Item = Interrupt>) {
        let mut irqs = irqs.into_iter().peekable();
        if irqs.peek().is_none() {
            return;
        }
        let handler = self
            .irq_handler
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(h) = handler {
            irqs.for_each(|irq| h(irq));
        }
    }

    /// The PASIDs the guest holds through the virtual command interface.
    pub fn guest_pasids(&self) -> Vec<Pasid> {
        lock(&self.guest_pasids).iter().copied().collect()
    }

    /// Counters of the vIOMMU's work.
    pub fn stats(&self) -> VIommuStats {
        let pasids = lock(&self.guest_pasids).len() as u64;
        self.counters.snapshot(pasids)
    }

    /// The most recent host calls that failed (up to 256), oldest first; empties the list.
    pub fn take_host_errors(&self) -> Vec<HostCallError> {
        std::mem::take(&mut lock(&self.host_errors))
    }

    /// Number of cached context entries, PASID entries and IOTLB entries (emulated
    /// translation).
    pub fn cached_entries(&self) -> (usize, usize, usize) {
        self.caches.len()
    }
}

/// The vIOMMU as invalidations reach it, for one descriptor of a shadow pass: its own
/// caches, and the shadow of what the guest changed. Host IOTLB and device-TLB
/// invalidations are forwarded by the caller after the caches are done.
struct Invalidated<'a> {
    viommu: &'a VIommu,
    pass: &'a mut SyncPass,
    irqs: &'a mut Vec<Interrupt>,
}

impl InvalidationUnit for Invalidated<'_> {
    type Mem = dyn PhysMem + Send + Sync;

    fn status_memory(&self) -> &Self::Mem {
        &*self.viommu.mem
    }

    fn invalidate_context_cache(
        &mut self,
        granularity: ContextCacheGranularity,
        sid: SourceId,
        fm: u8,
    ) {
        let v = self.viommu;
        v.caches.invalidate_context(granularity, sid, fm);
        v.resync_context(granularity, sid, fm, self.pass, self.irqs);
    }

    fn invalidate_pasid_cache(
        &mut self,
        granularity: PasidCacheGranularity,
        did: DomainId,
        pasid: Pasid,
    ) {
        let v = self.viommu;
        v.caches.invalidate_pasid(granularity, did, pasid);
        v.sync_pasid_cache(granularity, did, pasid, self.pass, self.irqs);
    }

    fn invalidate_iotlb(&mut self, inv: IotlbInvalidation) {
        self.viommu.invalidate_iotlb(inv);
    }

    /// Requests without PASID from a passthrough device use the host's second level (GPA),
    /// which the guest does not program: nothing of the guest's is cached for them. A
    /// PASID-based device-TLB invalidation is forwarded to the host by the caller.
    fn invalidate_device_tlb(&mut self, _: SourceId, _: Option<Pasid>, _: bool, _: u64, _: bool) {}

    fn page_group_response(
        &mut self,
        rid: SourceId,
        pasid: Option<Pasid>,
        prg_index: u16,
        response: ResponseCode,
    ) {
        self.viommu.flush_invalidations(self.pass);
        self.viommu
            .forward_page_response(rid, pasid, prg_index, response);
    }

    /// The host invalidations the pass gathered go down before a wait completes.
    fn drain(&mut self) {
        self.viommu.flush_invalidations(self.pass);
    }
}
