//! The register interface (VT-d §10.4) and what register writes set in motion: the root
//! table pointer, translation enable, queued invalidation (§6.5.2), fault recording (§7.2)
//! and the page request queue (§7.5).

use std::sync::atomic::Ordering;
use std::sync::{MutexGuard, PoisonError, TryLockError};
use vsva_mem::PhysMem;

use vsva_vtd::inv_desc::InvDesc;
use vsva_vtd::invalidation::{self, Completion};
use vsva_vtd::prq::PageRequestDesc;
use vsva_vtd::regs::layout::offset;
use vsva_vtd::regs::{
    AddressType, Interrupt, InvQueue, Iqei, RegEffect, RegEffects, RegError, RegisterGuard, Ttm,
    VcmdResponse,
};
use vsva_vtd::{
    addr::Pasid, addr::SourceId, fault::FaultReason, request::RootState, request::TranslationFault,
    walk::AccessRequest,
};

use super::qi::Pending;
use super::{Iommu, ROOT_STRICT};

impl Iommu {
    /// A register read of `size` bytes (4 or 8) at `offset`.
    pub fn mmio_read(&self, offset: u64, size: usize) -> Result<u64, RegError> {
        self.regs.read(offset, size)
    }

    /// A register write, with the side effects the written register has.
    pub fn mmio_write(&self, offset: u64, size: usize, value: u64) -> Result<(), RegError> {
        // A tail write is how software submits (§6.5.2): the drain lock, if free, is taken
        // first, in the order a drain takes both, so that the drain it starts reads the
        // queue under this write's register lock instead of taking that lock again. If a
        // drain is running, the write goes the general way below, which tries again.
        let draining = if offset & !7 == offset::IQT {
            match self.qi_pending.try_lock() {
                Ok(pending) => Some(pending),
                Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
                Err(TryLockError::WouldBlock) => None,
            }
        } else {
            None
        };
        let mut effects = RegEffects::new();
        let mut regs = self.regs.lock();
        regs.write(offset, size, value, &mut effects)?;
        if let (Some(draining), [RegEffect::ProcessInvalidationQueue]) = (draining, &effects[..]) {
            self.drain_queue(draining, regs);
            return Ok(());
        }
        drop(regs);
        for &effect in &effects {
            match effect {
                RegEffect::RootTableSet(_) | RegEffect::TranslationEnabled(_) => self.latch_root(),
                RegEffect::ProcessInvalidationQueue => self.process_invalidation_queue(),
                RegEffect::RegisterInvalidation(desc) => self.register_invalidation(&desc),
                RegEffect::VirtualCommand(_) => {
                    // The physical unit has no virtual command interface (ECAP.VCS is 0).
                    let _ = self
                        .regs
                        .lock()
                        .complete_virtual_command(VcmdResponse::InvalidCommand);
                }
                RegEffect::Interrupt(irq) => self.raise(irq),
                RegEffect::QueuedInvalidationEnabled(_)
                | RegEffect::InterruptRemappingEnabled(_)
                | RegEffect::InterruptRemapTableSet(_)
                | RegEffect::WriteBufferFlush => {}
            }
        }
        Ok(())
    }

    /// A register-based context-cache or IOTLB invalidation (CCMD_REG, IOTLB_REG: §6.5.1),
    /// complete when the register write returns (ICC, IVT read clear): carried out, then
    /// drained as the queued path drains at its wait (§6.5.5; the model reports CAP.DRD
    /// and CAP.DWD and drains whatever DR and DW ask), so that no request that used a
    /// translation it removed is still moving bytes. The drain holds the queue's drain
    /// lock, which serialises every drain of the unit; a queue tail written meanwhile
    /// (possible only if software enabled QI before this completed) found that lock taken
    /// and is looked at afterwards.
    fn register_invalidation(&self, desc: &InvDesc) {
        let mut pending = self
            .qi_pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Register-based invalidations carry no status write: nothing can fail.
        let _ = self.execute(desc, &mut pending);
        self.carry_out(&mut pending);
        self.drain.drain();
        drop(pending);
        self.process_invalidation_queue();
    }

    /// Makes the translation state follow GSTS.TES and the latched root table.
    fn latch_root(&self) {
        let state = RootState::word(&self.regs.lock());
        // Strict mode shares the word: keep its bit. The update cannot fail: the closure
        // always gives a value.
        let _ = self
            .root
            .fetch_update(Ordering::Release, Ordering::Relaxed, |old| {
                Some(state | (old & ROOT_STRICT))
            });
    }

    /// Fetches and carries out descriptors from IQH up to IQT; stops at an invalid one with
    /// the invalidation queue error (IQE) set and IQH left on it.
    ///
    /// One thread drains at a time; a thread that finds another draining leaves the new
    /// descriptors to it. The register lock is taken once to see what is queued and once
    /// to move IQH past what was carried out (and to look for more); the drainer lets the
    /// drain go while it still holds the register lock, so a tail written after its last
    /// look finds the drain free, and none is missed.
    fn process_invalidation_queue(&self) {
        let draining = match self.qi_pending.try_lock() {
            Ok(pending) => pending,
            // What a drain that panicked left is carried out by this one.
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return,
        };
        self.drain_queue(draining, self.regs.lock());
    }

    /// [`Self::process_invalidation_queue`]'s passes, with the drain lock held
    /// (`draining`) and the register lock taken after it (`regs`).
    fn drain_queue<'u>(
        &'u self,
        mut draining: MutexGuard<'u, Pending>,
        mut regs: RegisterGuard<'u>,
    ) {
        loop {
            let queued = regs.next_inv_desc().and(regs.inv_queue());
            let Some(queue) = queued else {
                drop(draining);
                return;
            };
            let scalable = regs.root_table().ttm == Ttm::Scalable;
            drop(regs);
            let (done, error) = self.drain_invalidation_queue(queue, scalable, &mut draining);
            regs = self.regs.lock();
            // Moves less only if a register write meanwhile stopped the queue (IQE, QI
            // disabled): IQH then stays, as the error requires.
            regs.advance_iqh_by(done);
            if let Some(iqei) = error {
                let irq = regs.set_iqe(iqei);
                drop(draining);
                drop(regs);
                irq.into_iter().for_each(|i| self.raise(i));
                return;
            }
        }
    }

    /// Carries out the descriptors `queue` holds from its head up to its tail, without
    /// the register lock ([`invalidation::drain`]); the number carried out, and the error
    /// that stopped the drain at the next one. Cache invalidations are gathered in
    /// `pending` and every one fetched is carried out before this returns.
    fn drain_invalidation_queue(
        &self,
        queue: InvQueue,
        scalable: bool,
        pending: &mut Pending,
    ) -> (u64, Option<Iqei>) {
        let drained = invalidation::drain(&*self.mem, queue, scalable, |desc| {
            self.carry_out_one(desc, pending)
        });
        self.carry_out(pending);
        drained
    }

    /// Carries out one fetched descriptor (its cache invalidations deferred to
    /// `pending`), raising the completion interrupt a wait asks for.
    fn carry_out_one(&self, desc: &InvDesc, pending: &mut Pending) -> Result<(), Iqei> {
        match self.execute(desc, pending) {
            Err(_) => Err(Iqei::FetchError),
            Ok(Completion::WaitInterrupt) => {
                let irq = self.regs.lock().set_iwc();
                irq.into_iter().for_each(|i| self.raise(i));
                Ok(())
            }
            Ok(Completion::Done) => Ok(()),
        }
    }

    /// Records a non-recoverable fault in the fault recording registers (§7.2.1).
    pub(crate) fn record_fault(
        &self,
        sid: SourceId,
        pasid: Option<Pasid>,
        addr: u64,
        reason: FaultReason,
        access: AccessRequest,
        address_type: AddressType,
    ) {
        let fault = TranslationFault {
            sid,
            pasid,
            addr,
            reason,
            fpd: false,
            recoverable: false,
        };
        let record = fault.record(access, address_type);
        self.stats.faults.fetch_add(1, Ordering::Relaxed);
        let (_, irq) = self.regs.lock().record_fault(&record);
        if let Some(irq) = irq {
            self.raise(irq);
        }
    }

    /// Queues a page request descriptor (§7.5.1); `false` when the queue was full (PRS.PRO
    /// set, the request dropped).
    pub(crate) fn queue_page_request(&self, desc: &PageRequestDesc) -> bool {
        let mut regs = self.regs.lock();
        let Some(slot) = regs.pq_tail_slot() else {
            let irq = regs.pq_overflow();
            drop(regs);
            irq.into_iter().for_each(|i| self.raise(i));
            return false;
        };
        let raw = desc.encode();
        for (i, q) in raw.iter().enumerate() {
            if self.mem.write_u64(slot + 8 * i as u64, *q).is_err() {
                return false;
            }
        }
        let irq = regs.pq_advance_tail().ok().flatten();
        drop(regs);
        self.stats.page_requests.fetch_add(1, Ordering::Relaxed);
        irq.into_iter().for_each(|i| self.raise(i));
        true
    }

    /// Delivers an interrupt message to the handler the platform registered.
    fn raise(&self, irq: Interrupt) {
        let handler = self
            .irq_handler
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(h) = handler {
            h(irq);
        }
    }
}
