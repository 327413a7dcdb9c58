//! Strict mode's record of fills an invalidation overtook.
//!
//! A walk that began before an IOTLB or PASID-based-IOTLB invalidation (VT-d §6.5.2.3,
//! §6.5.2.4) and ends after it may have read what the invalidation was for: its result
//! is not cached (the fill token is refused, see [`Iotlb::begin_fill`]), and the request
//! that walked is drained by the invalidation's wait. Nothing stale is ever looked up, so
//! the stale-hit check never sees it; strict mode records it here instead, naming the
//! request and the descriptor that overtook it, for the person checking a driver's
//! invalidation timing.
//!
//! [`Iotlb::begin_fill`]: super::iotlb::Iotlb::begin_fill

use std::collections::VecDeque;
use std::fmt;
use std::sync::PoisonError;

use vsva_vtd::{addr::Pasid, addr::SourceId, inv_desc::InvDesc};

use super::iotlb::IotlbEntry;
use super::Iommu;

/// IOTLB invalidations remembered to name the one that overtook a fill.
const INVALIDATIONS_KEPT: usize = 64;
/// Records kept until [`Iommu::take_overtaken_fills`]; later ones are only logged.
const RECORDS_KEPT: usize = 1024;

/// A walk whose IOTLB fill an invalidation overtook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OvertakenFill {
    /// Requester id of the request that walked.
    pub sid: SourceId,
    /// The PASID it was translated with.
    pub pasid: Pasid,
    /// The address it translated.
    pub addr: u64,
    /// What the walk gave (used by that request only, never cached).
    pub walked: IotlbEntry,
    /// The first invalidation that ran between the walk's start and its fill; `None` when
    /// it is no longer remembered (more than 64 invalidations ran meanwhile, or strict mode
    /// was turned on in between).
    pub invalidation: Option<InvDesc>,
}

impl fmt::Display for OvertakenFill {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "fill overtaken: sid {} {} addr {:#x} walked to page {:#x} ({:?}), not cached; \
             overtaken by ",
            self.sid, self.pasid, self.addr, self.walked.output, self.walked.kind
        )?;
        match &self.invalidation {
            Some(d) => write!(f, "{d:?}"),
            None => write!(f, "an invalidation no longer remembered"),
        }
    }
}

/// The invalidations strict mode remembers and the overtaken fills it found.
#[derive(Debug, Default)]
pub(super) struct FillLog {
    /// The IOTLB generation each invalidation advanced from, and the descriptor; newest
    /// last.
    invalidations: VecDeque<(u64, InvDesc)>,
    overtaken: Vec<OvertakenFill>,
}

impl Iommu {
    /// In strict mode, remembers the IOTLB or PASID-based-IOTLB invalidation `desc`, which
    /// is about to advance the IOTLB's generation. Called by the queue processor, which
    /// runs one descriptor at a time, so the generation read is the one it advances from.
    pub(super) fn note_iotlb_invalidation(&self, desc: &InvDesc) {
        if !self.strict() {
            return;
        }
        let mut log = self.fills.lock().unwrap_or_else(PoisonError::into_inner);
        if log.invalidations.len() == INVALIDATIONS_KEPT {
            log.invalidations.pop_front();
        }
        log.invalidations
            .push_back((self.iotlb.begin_fill(), *desc));
    }

    /// Records (strict mode) that the walk of `addr` for `sid`/`pasid`, begun with IOTLB
    /// fill token `fill`, was refused by the IOTLB because an invalidation ran meanwhile.
    pub(super) fn report_overtaken_fill(
        &self,
        fill: u64,
        sid: SourceId,
        pasid: Pasid,
        addr: u64,
        walked: IotlbEntry,
    ) {
        let mut log = self.fills.lock().unwrap_or_else(PoisonError::into_inner);
        let invalidation = log
            .invalidations
            .iter()
            .find(|&&(from, _)| from == fill)
            .map(|&(_, d)| d);
        let event = OvertakenFill {
            sid,
            pasid,
            addr,
            walked,
            invalidation,
        };
        // A correct race (the walk's request is drained by the invalidation's wait): not a
        // warning, or every multi-VM strict run would print them.
        tracing::debug!("{event}");
        if log.overtaken.len() < RECORDS_KEPT {
            log.overtaken.push(event);
        }
    }

    /// The overtaken fills strict mode has found, oldest first (at most 1,024 between two
    /// calls); empties the list.
    pub fn take_overtaken_fills(&self) -> Vec<OvertakenFill> {
        std::mem::take(
            &mut self
                .fills
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .overtaken,
        )
    }
}
