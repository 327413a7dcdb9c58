//! Synchronous submission to the invalidation queue (VT-d §6.5.2), as Linux's
//! `qi_submit_sync` does it: the descriptors, then an invalidation wait descriptor with a
//! status write into a per-slot status word, then IQT; the driver polls the status word
//! and watches FSTS for queue errors.

use std::sync::atomic::Ordering;

use vsva_vtd::inv_desc::InvDescType;
use vsva_vtd::regs::layout::{fsts, iq, iqercd, offset};
use vsva_vtd::{Gpa, InvDesc, PhysMem};

use super::{lock, DriverError, IommuDriver, POLL_LIMIT};
use crate::frames::FRAME_SIZE;

/// The queue holds 2^QS pages: 2 pages of 256-bit descriptors, 256 entries, as Linux
/// sizes it in scalable mode.
const QS: u64 = 1;
/// Pages of the invalidation queue.
pub(crate) const QUEUE_PAGES: u64 = 1 << QS;
/// Size of a 256-bit descriptor.
const DESC_SIZE: u64 = 32;
/// Descriptors the queue holds.
const ENTRIES: u64 = QUEUE_PAGES * FRAME_SIZE / DESC_SIZE;
/// Status words (4 bytes, one per queue slot) as Linux's `desc_status` values.
const QI_IN_USE: u32 = 1;
const QI_DONE: u32 = 2;

/// The driver's side of the invalidation queue.
#[derive(Debug)]
pub(crate) struct InvQueue {
    /// Queue base (IQA).
    pub(crate) base: Gpa,
    /// One status word per slot, for the wait descriptor in that slot.
    pub(crate) status: Gpa,
    /// The slot software fills next (IQT / 32).
    tail: u64,
}

impl InvQueue {
    pub(crate) fn new(base: Gpa, status: Gpa) -> Self {
        InvQueue {
            base,
            status,
            tail: 0,
        }
    }
}

impl IommuDriver {
    /// `dmar_enable_qi`: IQT to 0, IQA with the queue, 256-bit descriptors (DW) and its
    /// size, then GCMD.QIE and wait for GSTS.QIES.
    pub(super) fn enable_qi(&self) -> Result<(), DriverError> {
        let base = {
            let mut q = lock(&self.qi);
            q.tail = 0;
            q.base
        };
        self.mmio.write(offset::IQT, 8, 0);
        self.mmio.write(offset::IQA, 8, base.0 | iq::IQA_DW | QS);
        self.update_gcmd(
            vsva_vtd::regs::layout::gcmd::QIE,
            true,
            vsva_vtd::regs::layout::gsts::QIES,
            "queued invalidation enable",
        )
    }

    /// Submits `descs` followed by an invalidation wait and waits for it.
    pub(crate) fn submit(&self, descs: &[InvDesc]) -> Result<(), DriverError> {
        self.submit_sync(descs, false)
    }

    /// `qi_submit_sync`: `descs`, then an invalidation wait with status write (and
    /// page-request drain when `drain`), then IQT; polls the status word until the unit
    /// writes it. The queue is idle between submissions, so it always has room.
    pub(crate) fn submit_sync(&self, descs: &[InvDesc], drain: bool) -> Result<(), DriverError> {
        let encoded = descs
            .iter()
            .map(InvDesc::encode)
            .collect::<Result<Vec<_>, _>>()?;
        let mut q = lock(&self.qi);
        let wait_index = (q.tail + descs.len() as u64) % ENTRIES;
        let status_addr = q.status.0 + 4 * wait_index;
        let wait = InvDesc::InvWait {
            sw: true,
            interrupt: false,
            fence: false,
            pd: drain,
            status_data: QI_DONE,
            status_addr,
        }
        .encode()?;
        self.mem.write(status_addr, &QI_IN_USE.to_le_bytes())?;
        let mut slot = q.tail;
        for raw in encoded.iter().chain([&wait]) {
            for (i, word) in raw.iter().enumerate() {
                self.mem
                    .write_u64(q.base.0 + slot * DESC_SIZE + 8 * i as u64, *word)?;
            }
            slot = (slot + 1) % ENTRIES;
        }
        q.tail = slot;
        let c = &self.counters;
        let invalidations = descs
            .iter()
            .filter(|d| d.desc_type() != InvDescType::PageGroupResponse)
            .count() as u64;
        c.invalidations.fetch_add(invalidations, Ordering::Relaxed);
        c.waits.fetch_add(1, Ordering::Relaxed);
        self.mmio.write(offset::IQT, 8, slot * DESC_SIZE);
        self.wait_status(&q, status_addr, wait_index, &wait)
    }

    /// Polls the wait descriptor's status word; on an invalidation queue error replaces
    /// the descriptor the queue stopped at with the wait descriptor and restarts the
    /// queue, as Linux's `qi_check_fault` does.
    fn wait_status(
        &self,
        q: &InvQueue,
        status_addr: u64,
        wait_index: u64,
        wait: &[u64; 4],
    ) -> Result<(), DriverError> {
        let mut error = None;
        for _ in 0..POLL_LIMIT {
            let mut word = [0u8; 4];
            self.mem.read(status_addr, &mut word)?;
            if u32::from_le_bytes(word) == QI_DONE {
                return error.map_or(Ok(()), Err);
            }
            let status = self.read32(offset::FSTS);
            if status & fsts::IQE != 0 {
                let iqei = (self.mmio.read(offset::IQERCD, 8) & iqercd::IQEI) as u8;
                let head = (self.mmio.read(offset::IQH, 8) & iq::OFFSET) / DESC_SIZE;
                if head != wait_index {
                    for (i, word) in wait.iter().enumerate() {
                        self.mem
                            .write_u64(q.base.0 + head * DESC_SIZE + 8 * i as u64, *word)?;
                    }
                }
                self.mmio.write(offset::FSTS, 4, u64::from(fsts::IQE));
                error = Some(DriverError::InvalidationQueue { iqei });
            } else if status & fsts::ITE != 0 {
                self.mmio.write(offset::FSTS, 4, u64::from(fsts::ITE));
                return Err(DriverError::InvalidationTimeout);
            }
            std::thread::yield_now();
        }
        Err(error.unwrap_or(DriverError::Timeout("invalidation wait status")))
    }
}
