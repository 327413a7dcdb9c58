//! Queued invalidation, the software side (VT-d §6.5.2): descriptors go into the
//! invalidation queue followed by an invalidation wait descriptor with a status write, and
//! the driver polls the status, as intel-iommu's `qi_submit_sync` does.

use vsva_hw::iommu::Iommu;
use vsva_hw::{FrameAllocator, PAGE_SIZE};
use vsva_vtd::regs::layout::{fsts, iq, iqercd, offset};
use vsva_vtd::regs::Iqei;
use vsva_vtd::{Hpa, InvDesc, PhysMem};

use super::error::DriverError;

/// IQA_REG.QS: the queue is `2^QS` pages, 256 descriptors of 256 bits (`QI_LENGTH`).
const QUEUE_ORDER: u64 = 1;
/// Bytes per descriptor (IQA_REG.DW = 1).
const DESC_SIZE: u64 = 32;
/// Status polls before a wait is declared lost. The model completes a wait while IQT is
/// written, so the first poll normally succeeds.
const POLL_LIMIT: u32 = 1 << 16;

/// The invalidation queue and the status word its waits write.
#[derive(Debug)]
pub(crate) struct InvalidationQueue {
    base: Hpa,
    entries: u64,
    /// Index of the next slot software fills (IQT_REG / 32).
    tail: u64,
    /// Where invalidation waits write their status.
    status: Hpa,
    /// The status value of the last wait.
    seq: u32,
}

impl InvalidationQueue {
    /// A queue in fresh host frames (zeroed, so every slot starts invalid).
    pub(crate) fn new(frames: &FrameAllocator) -> Result<Self, DriverError> {
        let size = PAGE_SIZE << QUEUE_ORDER;
        let base = frames
            .alloc_range(size, size)
            .map_err(|_| DriverError::OutOfMemory)?;
        let status = match frames.alloc_frame() {
            Ok(s) => s,
            Err(_) => {
                release(frames, base);
                return Err(DriverError::OutOfMemory);
            }
        };
        Ok(InvalidationQueue {
            base,
            entries: size / DESC_SIZE,
            tail: 0,
            status,
            seq: 0,
        })
    }

    /// The IQA_REG value: base, 256-bit descriptors, size.
    pub(crate) fn iqa(&self) -> u64 {
        self.base.0 | iq::IQA_DW | QUEUE_ORDER
    }

    /// Returns the queue's frames; the queue must be disabled.
    pub(crate) fn release(self, frames: &FrameAllocator) {
        release(frames, self.base);
        release(frames, self.status);
    }

    /// Carries out `descs` in order and waits until hardware has completed them. With
    /// `drain_page_requests` the waits carry PD (§7.10: page requests queued before are
    /// flushed to the page request queue first).
    ///
    /// Descriptors are checked before any is queued; a bad one changes nothing.
    pub(crate) fn submit(
        &mut self,
        hw: &Iommu,
        descs: &[InvDesc],
        drain_page_requests: bool,
    ) -> Result<(), DriverError> {
        let encoded = descs
            .iter()
            .map(|d| {
                d.encode()
                    .map_err(|e| DriverError::invalid("invalidation descriptor", e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Each batch leaves one slot free (a full queue has IQT one behind IQH) and one
        // for its wait.
        let batch = (self.entries - 2) as usize;
        let mut first_error = None;
        for chunk in encoded.chunks(batch) {
            if let Err(e) = self.submit_batch(hw, chunk, drain_page_requests) {
                first_error.get_or_insert(e);
            }
        }
        if encoded.is_empty() {
            self.submit_batch(hw, &[], drain_page_requests)?;
        }
        first_error.map_or(Ok(()), Err)
    }

    fn submit_batch(
        &mut self,
        hw: &Iommu,
        descs: &[[u64; 4]],
        pd: bool,
    ) -> Result<(), DriverError> {
        let mem = &**hw.memory();
        self.wait_for_room(hw, descs.len() as u64 + 1)?;
        for raw in descs {
            self.put(mem, raw)?;
        }
        self.seq = self.seq.wrapping_add(1).max(1);
        let wait = InvDesc::InvWait {
            sw: true,
            interrupt: false,
            fence: true,
            pd,
            status_data: self.seq,
            status_addr: self.status.0,
        }
        .encode()
        .map_err(|e| DriverError::invalid("invalidation wait", e.to_string()))?;
        mem.write(self.status.0, &0u32.to_le_bytes())?;
        let wait_slot = self.tail;
        self.put(mem, &wait)?;
        hw.mmio_write(offset::IQT, 8, self.tail * DESC_SIZE)?;
        self.poll(hw, wait_slot)
    }

    /// Writes one descriptor at the tail and advances the tail (not yet IQT_REG).
    fn put(&mut self, mem: &impl PhysMem, raw: &[u64; 4]) -> Result<(), DriverError> {
        let slot = self.base.0 + self.tail * DESC_SIZE;
        for (i, q) in raw.iter().enumerate() {
            mem.write_u64(slot + 8 * i as u64, *q)?;
        }
        self.tail = (self.tail + 1) % self.entries;
        Ok(())
    }

    fn head(&self, hw: &Iommu) -> Result<u64, DriverError> {
        Ok((hw.mmio_read(offset::IQH, 8)? & iq::OFFSET) / DESC_SIZE)
    }

    fn wait_for_room(&self, hw: &Iommu, need: u64) -> Result<(), DriverError> {
        for _ in 0..POLL_LIMIT {
            let used = (self.tail + self.entries - self.head(hw)?) % self.entries;
            if self.entries - 1 - used >= need {
                return Ok(());
            }
            std::thread::yield_now();
        }
        Err(DriverError::QueueTimeout)
    }

    /// Polls the status word of the wait in `wait_slot`. An invalidation queue error on a
    /// descriptor before it is reported after the descriptor is replaced by a no-op and
    /// the queue restarted, so that the wait still completes (as `qi_check_fault` does).
    fn poll(&self, hw: &Iommu, wait_slot: u64) -> Result<(), DriverError> {
        let mem = hw.memory();
        let mut error = None;
        for _ in 0..POLL_LIMIT {
            let mut status = [0u8; 4];
            mem.read(self.status.0, &mut status)?;
            if u32::from_le_bytes(status) == self.seq {
                return error.map_or(Ok(()), Err);
            }
            let fsts = hw.mmio_read(offset::FSTS, 4)? as u32;
            if fsts & fsts::IQE != 0 {
                let index = self.head(hw)?;
                let iqei = iqei_of(hw.mmio_read(offset::IQERCD, 8)? & iqercd::IQEI);
                tracing::error!("vt-d: invalidation queue error {iqei:?} at descriptor {index}");
                error.get_or_insert(DriverError::QueueError { iqei, index });
                if index == wait_slot {
                    hw.mmio_write(offset::FSTS, 4, fsts::IQE.into())?;
                    return Err(DriverError::QueueError { iqei, index });
                }
                let noop = InvDesc::InvWait {
                    sw: false,
                    interrupt: false,
                    fence: false,
                    pd: false,
                    status_data: 0,
                    status_addr: 0,
                }
                .encode()
                .map_err(|e| DriverError::invalid("invalidation wait", e.to_string()))?;
                let slot = self.base.0 + index * DESC_SIZE;
                for (i, q) in noop.iter().enumerate() {
                    mem.write_u64(slot + 8 * i as u64, *q)?;
                }
                hw.mmio_write(offset::FSTS, 4, fsts::IQE.into())?;
                continue;
            }
            std::thread::yield_now();
        }
        Err(DriverError::QueueTimeout)
    }
}

fn release(frames: &FrameAllocator, hpa: Hpa) {
    if let Err(e) = frames.free(hpa) {
        tracing::error!("vt-d: freeing queue memory {hpa}: {e}");
    }
}

/// IQERCD_REG.IQEI as its enumeration.
fn iqei_of(raw: u64) -> Iqei {
    match raw {
        1 => Iqei::InvalidTail,
        2 => Iqei::FetchError,
        3 => Iqei::InvalidType,
        4 => Iqei::ReservedField,
        5 => Iqei::InvalidWidth,
        6 => Iqei::TailMisaligned,
        7 => Iqei::InvalidTtm,
        _ => Iqei::NotAvailable,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    use super::*;
    use vsva_hw::iommu::IommuConfig;
    use vsva_hw::HostMemory;
    use vsva_vtd::inv_desc::IotlbGranularity;
    use vsva_vtd::regs::layout::gcmd;
    use vsva_vtd::DomainId;

    fn unit() -> (Arc<Iommu>, FrameAllocator, InvalidationQueue) {
        let mem = HostMemory::new(16 << 20).unwrap();
        let frames = FrameAllocator::new(mem.clone());
        let hw = Iommu::new(mem, IommuConfig::default()).unwrap();
        let q = InvalidationQueue::new(&frames).unwrap();
        hw.mmio_write(offset::IQT, 8, 0).unwrap();
        hw.mmio_write(offset::IQA, 8, q.iqa()).unwrap();
        hw.mmio_write(offset::GCMD, 4, gcmd::QIE.into()).unwrap();
        (hw, frames, q)
    }

    fn iotlb(did: u16) -> InvDesc {
        InvDesc::Iotlb {
            granularity: IotlbGranularity::DomainSelective,
            dr: true,
            dw: true,
            did: DomainId(did),
            addr: 0,
            ih: false,
            am: 0,
        }
    }

    fn processed(hw: &Iommu) -> u64 {
        hw.stats().descriptors.load(Ordering::Relaxed)
    }

    #[test]
    fn batches_wrap_around_and_split() {
        let (hw, frames, mut q) = unit();
        for i in 0..300 {
            q.submit(&hw, &[iotlb(i)], false).unwrap();
        }
        assert_eq!(processed(&hw), 600, "each descriptor and its wait");
        let many: Vec<InvDesc> = (0..600).map(iotlb).collect();
        q.submit(&hw, &many, true).unwrap();
        // 600 descriptors in batches of 254, each with its wait.
        assert_eq!(processed(&hw), 600 + 600 + 3);
        q.submit(&hw, &[], false).unwrap();
        assert_eq!(processed(&hw), 1204);
        q.release(&frames);
        assert_eq!(frames.allocated_bytes(), 0);
    }

    #[test]
    fn a_refused_descriptor_is_reported_and_the_queue_goes_on() {
        let (hw, _frames, mut q) = unit();
        let good = iotlb(5).encode().unwrap();
        let mut bad = good;
        bad[1] |= 1 << 7;
        let before = processed(&hw);
        let e = q.submit_batch(&hw, &[good, bad, good], false).unwrap_err();
        assert_eq!(
            e,
            DriverError::QueueError {
                iqei: Iqei::ReservedField,
                index: 1
            }
        );
        assert_eq!(e.errno(), libc::EIO);
        // The good descriptors, the no-op in place of the bad one, and the wait ran.
        assert_eq!(processed(&hw) - before, 4);
        assert_eq!(hw.mmio_read(offset::FSTS, 4).unwrap() as u32 & fsts::IQE, 0);
        q.submit(&hw, &[iotlb(6)], false).unwrap();
        assert_eq!(processed(&hw) - before, 6);
    }
}
