//! Synchronous submission to the invalidation queue (VT-d §6.5.2): the shared driver's
//! [`InvalidationQueue`] (`qi_submit_sync` with `qi_check_fault`'s recovery), in guest
//! RAM, with the driver's counters.

use vsva_vtd::inv_desc::InvDesc;
use vsva_vtd::inv_desc::InvDescType;
use vsva_vtd_driver::QUEUE_BYTES;

use super::{bump_held, lock, GuestIommuError, IommuDriver, Regs};
use crate::frames::FRAME_SIZE;

/// Pages of the invalidation queue.
pub(crate) const QUEUE_PAGES: u64 = QUEUE_BYTES / FRAME_SIZE;

impl IommuDriver {
    /// `dmar_enable_qi`: IQT to 0, IQA with the queue, 256-bit descriptors (DW) and its
    /// size, then GCMD.QIE and wait for GSTS.QIES.
    pub(super) fn enable_qi(&self) -> Result<(), GuestIommuError> {
        let mut q = lock(&self.qi);
        q.reset();
        Ok(self.gcmd.enable_qi(&Regs(&*self.mmio), q.iqa())?)
    }

    /// Submits `descs` followed by an invalidation wait and waits for it.
    pub(crate) fn submit(&self, descs: &[InvDesc]) -> Result<(), GuestIommuError> {
        self.submit_sync(descs, false)
    }

    /// `qi_submit_sync`: `descs`, then an invalidation wait with status write (and
    /// page-request drain when `drain`), then IQT; waits for the status write.
    pub(crate) fn submit_sync(
        &self,
        descs: &[InvDesc],
        drain: bool,
    ) -> Result<(), GuestIommuError> {
        let mut q = lock(&self.qi);
        let c = &self.counters;
        let invalidations = descs
            .iter()
            .filter(|d| d.desc_type() != InvDescType::PageGroupResponse)
            .count() as u64;
        let submitted = q.submit(&Regs(&*self.mmio), &*self.mem, descs, drain);
        if !matches!(submitted, Err(vsva_vtd_driver::Error::Descriptor(_))) {
            // With the queue's lock `q` held.
            bump_held(&c.invalidations, invalidations);
            bump_held(&c.waits, 1);
        }
        Ok(submitted?)
    }
}
