//! The output queues (IHI 0070 §7, §8): event records (32 bytes) and PRI queue entries
//! (16 bytes) written to host memory at EVENTQ_PROD / PRIQ_PROD. A full queue sets its
//! overflow flag (PROD.OVFLG toggles away from CONS.OVACKFLG) and the record is lost.

use vsva_mem::PhysMem;
use vsva_smmuv3::regs::{gerror, Irq};
use vsva_smmuv3::{event::Event, priq::PriqEntry, ste::Eats};

use super::{Smmu, State};

/// Why a page request did not reach the PRI queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PriRefused {
    /// The SMMU lacks PRI, or the stream's STE is invalid or does not enable ATS (EATS).
    #[error("PRI is not enabled for the stream")]
    NotEnabled,
    /// The PRI queue is disabled, full (its overflow flag is set) or unwritable.
    #[error("the PRI queue lost the request")]
    Lost,
}

impl Smmu {
    /// Writes `event` to the event queue; false when it was lost (queue disabled, full, or
    /// its memory unwritable, which activates GERROR.EVENTQ_ABT_ERR).
    pub(super) fn record_event(&self, state: &mut State, event: &Event) -> bool {
        let Some(addr) = state.regs.push_event() else {
            Smmu::count(&self.stats.events_lost);
            return false;
        };
        if !self.write_words(addr, &event.encode()) {
            Smmu::count(&self.stats.events_lost);
            self.raise_gerror(&mut state.regs, gerror::EVENTQ_ABT_ERR);
            return false;
        }
        Smmu::count(&self.stats.events);
        self.signal(&mut state.regs, Irq::Eventq);
        true
    }

    /// A page request from the device with StreamID `entry.sid` (PCIe PRI, §8), written to
    /// the PRI queue.
    pub fn page_request(&self, entry: &PriqEntry) -> Result<(), PriRefused> {
        if !self.features.pri {
            return Err(PriRefused::NotEnabled);
        }
        let mut state = self.lock();
        match self.ste_for(&mut state, entry.sid) {
            Ok(ste) if ste.eats != Eats::Abort => {}
            _ => return Err(PriRefused::NotEnabled),
        }
        let Some(addr) = state.regs.push_page_request() else {
            return Err(PriRefused::Lost);
        };
        if !self.write_words(addr, &entry.encode()) {
            self.raise_gerror(&mut state.regs, gerror::PRIQ_ABT_ERR);
            return Err(PriRefused::Lost);
        }
        Smmu::count(&self.stats.page_requests);
        self.signal(&mut state.regs, Irq::Priq);
        Ok(())
    }

    fn write_words(&self, addr: u64, words: &[u64]) -> bool {
        let mut bytes = Vec::with_capacity(words.len() * 8);
        for w in words {
            bytes.extend_from_slice(&w.to_le_bytes());
        }
        match self.mem.write(addr, &bytes) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(addr, %e, "SMMU queue write aborted");
                false
            }
        }
    }
}
