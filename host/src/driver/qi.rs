//! The host's invalidation queue: the shared driver's [`InvalidationQueue`] in host frames.

use vsva_hw::memory::FrameAllocator;
use vsva_vtd::addr::Hpa;
use vsva_vtd_driver::{InvalidationQueue, QUEUE_BYTES};

use super::error::DriverError;

/// A queue in fresh host frames (zeroed, so every slot starts invalid), with a frame for
/// its status words.
pub(crate) fn alloc(frames: &FrameAllocator) -> Result<InvalidationQueue, DriverError> {
    let base = frames
        .alloc_range(QUEUE_BYTES, QUEUE_BYTES)
        .map_err(|_| DriverError::OutOfMemory)?;
    let status = match frames.alloc_frame() {
        Ok(s) => s,
        Err(_) => {
            free(frames, base);
            return Err(DriverError::OutOfMemory);
        }
    };
    Ok(InvalidationQueue::new(base.0, status.0))
}

/// Returns the queue's frames; queued invalidation must be off.
pub(crate) fn release(frames: &FrameAllocator, queue: InvalidationQueue) {
    free(frames, Hpa(queue.base()));
    free(frames, Hpa(queue.status_words()));
}

fn free(frames: &FrameAllocator, hpa: Hpa) {
    if let Err(e) = frames.free(hpa) {
        tracing::error!("vt-d: freeing queue memory {hpa}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    use super::*;
    use crate::driver::regs::Mmio;
    use vsva_hw::iommu::{Iommu, IommuConfig};
    use vsva_hw::memory::HostMemory;
    use vsva_vtd::inv_desc::IotlbGranularity;
    use vsva_vtd::regs::layout::{fsts, offset};
    use vsva_vtd::regs::Iqei;
    use vsva_vtd::{addr::DomainId, inv_desc::InvDesc};
    use vsva_vtd_driver::{Error, GlobalCommand};

    fn unit() -> (Arc<Iommu>, FrameAllocator, InvalidationQueue) {
        let mem = HostMemory::new(16 << 20).unwrap();
        let frames = FrameAllocator::new(mem.clone());
        let hw = Iommu::new(mem, IommuConfig::default()).unwrap();
        let q = alloc(&frames).unwrap();
        GlobalCommand::new().enable_qi(&Mmio(&hw), q.iqa()).unwrap();
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

    fn submit(
        hw: &Iommu,
        q: &mut InvalidationQueue,
        descs: &[InvDesc],
        pd: bool,
    ) -> Result<(), Error> {
        q.submit(&Mmio(hw), &**hw.memory(), descs, pd)
    }

    #[test]
    fn batches_wrap_around_and_split() {
        let (hw, frames, mut q) = unit();
        for i in 0..300 {
            submit(&hw, &mut q, &[iotlb(i)], false).unwrap();
        }
        assert_eq!(processed(&hw), 600, "each descriptor and its wait");
        let many: Vec<InvDesc> = (0..600).map(iotlb).collect();
        submit(&hw, &mut q, &many, true).unwrap();
        // 600 descriptors in batches of 254, each with its wait.
        assert_eq!(processed(&hw), 600 + 600 + 3);
        submit(&hw, &mut q, &[], false).unwrap();
        assert_eq!(processed(&hw), 1204);
        release(&frames, q);
        assert_eq!(frames.allocated_bytes(), 0);
    }

    #[test]
    fn a_refused_descriptor_is_reported_and_the_queue_goes_on() {
        let (hw, _frames, mut q) = unit();
        // A status write the model cannot carry out (beyond host memory): IQE.
        let bad = InvDesc::InvWait {
            sw: true,
            interrupt: false,
            fence: false,
            pd: false,
            status_data: 1,
            status_addr: 1 << 40,
        };
        let before = processed(&hw);
        let e = submit(&hw, &mut q, &[iotlb(5), bad, iotlb(5)], false).unwrap_err();
        assert_eq!(
            e,
            Error::QueueError {
                iqei: Iqei::FetchError,
                index: 1
            }
        );
        assert_eq!(DriverError::from(e).errno(), libc::EIO);
        // The good descriptors, the wait's copy in place of the bad one, and the wait ran;
        // the model counts the refused wait too, since it failed while being carried out.
        assert_eq!(processed(&hw) - before, 5);
        assert_eq!(hw.mmio_read(offset::FSTS, 4).unwrap() as u32 & fsts::IQE, 0);
        submit(&hw, &mut q, &[iotlb(6)], false).unwrap();
        assert_eq!(processed(&hw) - before, 7);
    }
}
