//! Queued invalidation, the software side (VT-d §6.5.2), as intel-iommu's
//! `qi_submit_sync` does it: the descriptors, then an invalidation wait descriptor whose
//! status write goes to a status word of its own slot, then IQT; the driver polls that
//! word and, while it waits, recovers from the errors of §6.5.2.10 as `qi_check_fault`
//! does:
//!
//! - IQE (a descriptor the unit refused): the refused descriptor is overwritten with a
//!   copy of the batch's wait, IQE is cleared so the queue runs again, and the submission
//!   fails with the error (Linux: `-EINVAL`).
//! - ITE (a device-TLB invalidation timed out): the unit aborted the pending waits; ITE is
//!   cleared and the batch submitted again (Linux: `-EAGAIN`, `restart`). Linux retries
//!   for ever; this driver gives up with [`Error::InvalidationTimeout`] after
//!   [`ITE_RETRIES`] resubmissions.
//! - ICE (a device's invalidation completion error): cleared.

use vsva_mem::PhysMem;
use vsva_vtd::inv_desc::InvDesc;
use vsva_vtd::regs::layout::{fsts, iq, iqercd, offset};
use vsva_vtd::regs::Iqei;

use crate::{Error, Registers, POLL_LIMIT};

/// IQA_REG.QS: the queue is `2^QS` pages, 256 descriptors of 256 bits (`QI_LENGTH`), as
/// Linux sizes it in scalable mode.
pub const QUEUE_ORDER: u64 = 1;
/// Bytes of the queue memory, naturally aligned.
pub const QUEUE_BYTES: u64 = 4096 << QUEUE_ORDER;
/// Bytes per descriptor (IQA_REG.DW = 1).
const DESC_SIZE: u64 = 32;
/// Descriptors the queue holds.
pub const QUEUE_ENTRIES: u64 = QUEUE_BYTES / DESC_SIZE;
/// Bytes of the status words: one 32-bit word per slot (Linux's `desc_status`).
pub const STATUS_BYTES: u64 = 4 * QUEUE_ENTRIES;
/// The status word of a slot whose wait is pending.
const QI_IN_USE: u32 = 1;
/// The value a completed wait writes (`QI_DONE`).
const QI_DONE: u32 = 2;
/// Resubmissions of a batch whose wait a device-TLB time-out aborted.
pub const ITE_RETRIES: u32 = 3;

/// How one submission of a batch ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Completion {
    /// The wait wrote its status.
    Done,
    /// A device-TLB time-out aborted the wait (FSTS.ITE).
    Aborted,
}

/// The driver's side of an invalidation queue: where it is and which slot software fills
/// next (IQT_REG / 32). The memory belongs to the user, who allocates it zeroed
/// ([`QUEUE_BYTES`] aligned to its size, and [`STATUS_BYTES`] of status words) and frees
/// it once queued invalidation is off.
#[derive(Debug)]
pub struct InvalidationQueue {
    base: u64,
    status: u64,
    tail: u64,
    /// The last batch's wait completed, so the unit has carried out every descriptor up to
    /// `tail` and the whole queue is free: the next batch needs no IQH read for room (as
    /// Linux's `reclaim_free_desc` frees slots from their status words, never reading
    /// IQH_REG). False after an error, an abort or a time-out, and after a reset.
    drained: bool,
}

impl InvalidationQueue {
    /// The queue at `base` with its status words at `status`.
    pub fn new(base: u64, status: u64) -> Self {
        InvalidationQueue {
            base,
            status,
            tail: 0,
            drained: false,
        }
    }

    /// The queue memory.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The status words.
    pub fn status_words(&self) -> u64 {
        self.status
    }

    /// The IQA_REG value: base, 256-bit descriptors (DW), size (QS). Enabling queued
    /// invalidation sets IQT to 0: call [`Self::reset`] with it.
    pub fn iqa(&self) -> u64 {
        self.base | iq::IQA_DW | QUEUE_ORDER
    }

    /// Software's tail back to slot 0, as IQT_REG when queued invalidation is enabled.
    pub fn reset(&mut self) {
        self.tail = 0;
        self.drained = false;
    }

    /// Carries out `descs` in order and waits until the unit has completed them
    /// (`qi_submit_sync`). With `drain_page_requests` the waits carry PD (§7.10: page
    /// requests queued before are written to the page request queue first).
    ///
    /// Every descriptor is encoded before any is queued, so one that cannot be encoded
    /// changes nothing. More descriptors than the queue takes at once go in batches, each
    /// with its wait; a failed batch does not stop the next, and the first error is
    /// returned.
    pub fn submit<R, M>(
        &mut self,
        regs: &R,
        mem: &M,
        descs: &[InvDesc],
        drain_page_requests: bool,
    ) -> Result<(), Error>
    where
        R: Registers + ?Sized,
        M: PhysMem + ?Sized,
    {
        if descs.is_empty() {
            return self.submit_batch(regs, mem, &[], drain_page_requests);
        }
        // A batch leaves a slot for its wait and one free (a full queue has IQT one
        // behind IQH).
        let batch = (QUEUE_ENTRIES - 2) as usize;
        // Every descriptor is checked before any is queued. A batch encodes each as it is
        // written to its slot and moves IQT only after the last (so a submission allocates
        // nothing, and one batch needs no check of its own); several batches are checked
        // first, since the first may be queued before a later one is encoded.
        if descs.len() > batch {
            for desc in descs {
                desc.encode()?;
            }
        }
        let mut first_error = None;
        for chunk in descs.chunks(batch) {
            if let Err(e) = self.submit_batch(regs, mem, chunk, drain_page_requests) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn submit_batch<R, M>(
        &mut self,
        regs: &R,
        mem: &M,
        descs: &[InvDesc],
        pd: bool,
    ) -> Result<(), Error>
    where
        R: Registers + ?Sized,
        M: PhysMem + ?Sized,
    {
        for attempt in 0..=ITE_RETRIES {
            if self.submit_once(regs, mem, descs, pd)? == Completion::Done {
                return Ok(());
            }
            timed_out(attempt);
        }
        Err(Error::InvalidationTimeout)
    }

    /// Queues the batch and its wait, moves IQT and waits.
    fn submit_once<R, M>(
        &mut self,
        regs: &R,
        mem: &M,
        descs: &[InvDesc],
        pd: bool,
    ) -> Result<Completion, Error>
    where
        R: Registers + ?Sized,
        M: PhysMem + ?Sized,
    {
        let count = descs.len() as u64;
        // A batch is at most `QUEUE_ENTRIES - 2` descriptors: a drained queue has room.
        if !self.drained {
            self.wait_for_room(regs, count + 2)?;
        }
        let index = self.tail;
        let wait_index = (index + count) % QUEUE_ENTRIES;
        let status_addr = self.status + 4 * wait_index;
        let wait = InvDesc::InvWait {
            sw: true,
            interrupt: false,
            fence: false,
            pd,
            status_data: QI_DONE,
            status_addr,
        }
        .encode()?;
        mem.write(status_addr, &QI_IN_USE.to_le_bytes())?;
        let mut slots = Slots::new(self.base, index);
        for desc in descs {
            slots.push(mem, &desc.encode()?)?;
        }
        slots.push(mem, &wait)?;
        slots.flush(mem)?;
        self.tail = (wait_index + 1) % QUEUE_ENTRIES;
        self.drained = false;
        regs.write(offset::IQT, 8, self.tail * DESC_SIZE)?;
        for _ in 0..POLL_LIMIT {
            if read_status(mem, status_addr)? == QI_DONE {
                // §6.5.2.8: the wait completes after every descriptor before it.
                self.drained = true;
                return Ok(Completion::Done);
            }
            if let Some(done) = self.check_fault(regs, mem, index, wait_index, &wait)? {
                return Ok(done);
            }
            std::thread::yield_now();
        }
        Err(Error::QueueTimeout)
    }

    /// `qi_check_fault`: what FSTS says about the batch from `index` to its wait at
    /// `wait_index`. `None` while it may still complete.
    fn check_fault<R, M>(
        &self,
        regs: &R,
        mem: &M,
        index: u64,
        wait_index: u64,
        wait: &[u64; 4],
    ) -> Result<Option<Completion>, Error>
    where
        R: Registers + ?Sized,
        M: PhysMem + ?Sized,
    {
        let fault = regs.read32(offset::FSTS)?;
        if fault & fsts::IQE != 0 {
            let head = (regs.read(offset::IQH, 8)? & iq::OFFSET) / DESC_SIZE;
            let iqei = iqei_of(regs.read(offset::IQERCD, 8)? & iqercd::IQEI);
            tracing::error!("vt-d: invalidation queue error {iqei:?} at descriptor {head}");
            let error = Error::QueueError { iqei, index: head };
            if head >= QUEUE_ENTRIES {
                // IQH outside the queue: nothing of ours to replace.
                regs.write(offset::FSTS, 4, fsts::IQE.into())?;
                return Err(error);
            }
            if (head + QUEUE_ENTRIES - index) % QUEUE_ENTRIES
                < (wait_index + QUEUE_ENTRIES - index) % QUEUE_ENTRIES
            {
                // One of this batch's descriptors: the wait's copy completes the batch.
                self.put(mem, head, wait)?;
                regs.write(offset::FSTS, 4, fsts::IQE.into())?;
                return Err(error);
            }
            // The wait itself, or a descriptor of an earlier batch that reported its
            // error already: a wait without status write lets the queue go on.
            self.put(mem, head, &noop()?)?;
            regs.write(offset::FSTS, 4, fsts::IQE.into())?;
            if head == wait_index {
                return Err(error);
            }
        }
        if fault & fsts::ITE != 0 {
            regs.write(offset::FSTS, 4, fsts::ITE.into())?;
            // §6.5.2.10: every wait pending at the time-out was aborted, ours unless it
            // had completed.
            if read_status(mem, self.status + 4 * wait_index)? != QI_DONE {
                return Ok(Some(Completion::Aborted));
            }
        }
        if fault & fsts::ICE != 0 {
            regs.write(offset::FSTS, 4, fsts::ICE.into())?;
        }
        Ok(None)
    }

    /// Waits until the queue has `need` free slots, from IQH_REG.
    fn wait_for_room<R: Registers + ?Sized>(&self, regs: &R, need: u64) -> Result<(), Error> {
        for _ in 0..POLL_LIMIT {
            let head = (regs.read(offset::IQH, 8)? & iq::OFFSET) / DESC_SIZE % QUEUE_ENTRIES;
            let used = (self.tail + QUEUE_ENTRIES - head) % QUEUE_ENTRIES;
            if QUEUE_ENTRIES - used >= need {
                return Ok(());
            }
            std::thread::yield_now();
        }
        Err(Error::QueueTimeout)
    }

    /// Writes one descriptor into `slot`.
    fn put<M: PhysMem + ?Sized>(&self, mem: &M, slot: u64, raw: &[u64; 4]) -> Result<(), Error> {
        let at = self.base + slot * DESC_SIZE;
        for (i, q) in raw.iter().enumerate() {
            mem.write_u64(at + 8 * i as u64, *q)?;
        }
        Ok(())
    }
}

/// Descriptors written to neighbouring slots of the queue from one, gathered and written
/// a run at a time (one memory write per [`SLOTS_WRITTEN`] descriptors, and at the end
/// of the ring).
struct Slots {
    base: u64,
    /// The slot of the first gathered descriptor.
    first: u64,
    buf: [u8; SLOTS_WRITTEN * DESC_SIZE as usize],
    len: usize,
}

/// Descriptors [`Slots`] gathers before it writes them.
const SLOTS_WRITTEN: usize = 8;

impl Slots {
    fn new(base: u64, first: u64) -> Self {
        Slots {
            base,
            first,
            buf: [0; SLOTS_WRITTEN * DESC_SIZE as usize],
            len: 0,
        }
    }

    /// Adds the descriptor of the next slot.
    fn push<M: PhysMem + ?Sized>(&mut self, mem: &M, raw: &[u64; 4]) -> Result<(), Error> {
        let at = self.len * DESC_SIZE as usize;
        for (b, q) in self.buf[at..at + DESC_SIZE as usize]
            .chunks_exact_mut(8)
            .zip(raw)
        {
            b.copy_from_slice(&q.to_le_bytes());
        }
        self.len += 1;
        if self.len == SLOTS_WRITTEN || self.first + self.len as u64 == QUEUE_ENTRIES {
            self.flush(mem)?;
        }
        Ok(())
    }

    /// Writes what was gathered.
    fn flush<M: PhysMem + ?Sized>(&mut self, mem: &M) -> Result<(), Error> {
        if self.len != 0 {
            let bytes = &self.buf[..self.len * DESC_SIZE as usize];
            mem.write(self.base + self.first * DESC_SIZE, bytes)?;
            self.first = (self.first + self.len as u64) % QUEUE_ENTRIES;
            self.len = 0;
        }
        Ok(())
    }
}

fn read_status<M: PhysMem + ?Sized>(mem: &M, addr: u64) -> Result<u32, Error> {
    let mut word = [0u8; 4];
    mem.read(addr, &mut word)?;
    Ok(u32::from_le_bytes(word))
}

/// An invalidation wait that writes nothing: a no-op in the queue.
fn noop() -> Result<[u64; 4], Error> {
    Ok(InvDesc::InvWait {
        sw: false,
        interrupt: false,
        fence: false,
        pd: false,
        status_data: 0,
        status_addr: 0,
    }
    .encode()?)
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

/// A device-TLB invalidation that timed out, logged out of line (rare), so the submit
/// path's code stays dense in the instruction cache.
#[cold]
#[inline(never)]
fn timed_out(attempt: u32) {
    tracing::warn!("vt-d: device-TLB invalidation timed out (attempt {attempt})");
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::testunit::Unit;
    use crate::GlobalCommand;
    use vsva_vtd::inv_desc::{IotlbGranularity, PasidCacheGranularity};
    use vsva_vtd::{addr::DomainId, addr::Pasid, addr::SourceId, inv_desc::InvDescType};

    const QUEUE: u64 = 0x2_0000;
    const STATUS: u64 = 0x3_0000;

    fn enabled() -> (Unit, InvalidationQueue) {
        let unit = Unit::new();
        let q = InvalidationQueue::new(QUEUE, STATUS);
        GlobalCommand::new().enable_qi(&unit, q.iqa()).unwrap();
        (unit, q)
    }

    fn iotlb(did: u16) -> InvDesc {
        InvDesc::Iotlb {
            granularity: IotlbGranularity::DomainSelective,
            dr: false,
            dw: false,
            did: DomainId(did),
            addr: 0,
            ih: false,
            am: 0,
        }
    }

    fn pasid_cache(pasid: u32) -> InvDesc {
        InvDesc::PasidCache {
            granularity: PasidCacheGranularity::PasidSelective,
            did: DomainId(1),
            pasid: Pasid::new(pasid).unwrap(),
        }
    }

    fn dev_tlb() -> InvDesc {
        crate::inv::dev_iotlb(
            SourceId::from_rid(0x10),
            &vsva_vtd::regs::Ecap::default(),
            None,
            0,
            crate::mask::WHOLE_SPACE,
        )
    }

    fn kinds(log: &[InvDesc]) -> Vec<InvDescType> {
        log.iter().map(InvDesc::desc_type).collect()
    }

    #[test]
    fn batches_wrap_around_and_split() {
        let (unit, mut q) = enabled();
        for i in 0..300 {
            q.submit(&unit, &unit.mem, &[iotlb(i)], false).unwrap();
        }
        let log = unit.take_log();
        assert_eq!(log.len(), 600, "each descriptor and its wait");
        assert_eq!(log[598], iotlb(299));
        // 300 two-slot submissions wrapped past slot 255; the last wait is in slot 87.
        assert_eq!(unit.regs().inv_queue().unwrap().tail, 600 % 256);
        let many: Vec<InvDesc> = (0..600).map(iotlb).collect();
        q.submit(&unit, &unit.mem, &many, true).unwrap();
        let log = unit.take_log();
        // 600 descriptors in batches of 254, each with its wait (PD set).
        assert_eq!(log.len(), 603);
        let waits: Vec<usize> = (0..log.len())
            .filter(|&i| {
                matches!(
                    log[i],
                    InvDesc::InvWait {
                        pd: true,
                        sw: true,
                        ..
                    }
                )
            })
            .collect();
        assert_eq!(waits, [254, 509, 602]);
        q.submit(&unit, &unit.mem, &[], false).unwrap();
        assert_eq!(kinds(&unit.take_log()), [InvDescType::InvWait]);
    }

    #[test]
    fn the_wait_is_linux_s_status_write_of_qi_done_into_its_slot() {
        let (unit, mut q) = enabled();
        q.submit(&unit, &unit.mem, &[iotlb(1), iotlb(2)], false)
            .unwrap();
        let log = unit.take_log();
        assert_eq!(
            log[2],
            InvDesc::InvWait {
                sw: true,
                interrupt: false,
                fence: false,
                pd: false,
                status_data: QI_DONE,
                status_addr: STATUS + 4 * 2,
            }
        );
        assert_eq!(read_status(&unit.mem, STATUS + 8).unwrap(), QI_DONE);
    }

    #[test]
    fn an_unencodable_descriptor_queues_nothing() {
        let (unit, mut q) = enabled();
        let bad = InvDesc::Iotlb {
            granularity: IotlbGranularity::PageSelective,
            dr: false,
            dw: false,
            did: DomainId(1),
            addr: 0,
            ih: false,
            am: 200,
        };
        assert!(matches!(
            q.submit(&unit, &unit.mem, &[iotlb(1), bad], false),
            Err(Error::Descriptor(_))
        ));
        assert!(unit.take_log().is_empty());
        assert_eq!(unit.regs().inv_queue().unwrap().tail, 0);
        // Nor when it is in a later batch than the first.
        let mut many: Vec<InvDesc> = (0..300).map(|i| iotlb(i as u16)).collect();
        many[299] = bad;
        assert!(matches!(
            q.submit(&unit, &unit.mem, &many, false),
            Err(Error::Descriptor(_))
        ));
        assert!(unit.take_log().is_empty());
        assert_eq!(unit.regs().inv_queue().unwrap().tail, 0);
    }

    #[test]
    fn iqe_recovery_skips_the_refused_descriptor() {
        let (unit, mut q) = enabled();
        q.submit(&unit, &unit.mem, &[iotlb(1)], false).unwrap();
        unit.take_log();
        *unit.reject.lock().unwrap() = Some(InvDescType::PasidCache);
        let e = q
            .submit(
                &unit,
                &unit.mem,
                &[iotlb(2), pasid_cache(3), iotlb(4)],
                false,
            )
            .unwrap_err();
        assert_eq!(
            e,
            Error::QueueError {
                iqei: Iqei::InvalidType,
                index: 3
            }
        );
        // The refused slot now holds the batch's wait; the rest of the batch ran.
        let log = unit.take_log();
        assert_eq!(
            kinds(&log),
            [
                InvDescType::Iotlb,
                InvDescType::InvWait,
                InvDescType::Iotlb,
                InvDescType::InvWait
            ]
        );
        assert_eq!(log[1], log[3]);
        assert_eq!(unit.regs().fsts() & fsts::IQE, 0);
        // The queue goes on.
        q.submit(&unit, &unit.mem, &[pasid_cache(3)], false)
            .unwrap();
        assert_eq!(
            kinds(&unit.take_log()),
            [InvDescType::PasidCache, InvDescType::InvWait]
        );
    }

    #[test]
    fn a_device_tlb_time_out_resubmits_the_batch() {
        let (unit, mut q) = enabled();
        unit.time_outs.store(1, Ordering::SeqCst);
        q.submit(&unit, &unit.mem, &[iotlb(1), dev_tlb()], false)
            .unwrap();
        // First attempt: the IOTLB invalidation, then the time-out aborted the wait; the
        // second attempt carried out the whole batch.
        assert_eq!(
            kinds(&unit.take_log()),
            [
                InvDescType::Iotlb,
                InvDescType::Iotlb,
                InvDescType::DevIotlb,
                InvDescType::InvWait
            ]
        );
        assert_eq!(unit.regs().fsts() & fsts::ITE, 0);
    }

    #[test]
    fn a_device_that_always_times_out_fails_the_submission() {
        let (unit, mut q) = enabled();
        unit.time_outs.store(u32::MAX, Ordering::SeqCst);
        assert_eq!(
            q.submit(&unit, &unit.mem, &[dev_tlb()], false),
            Err(Error::InvalidationTimeout)
        );
        assert!(unit.take_log().is_empty());
        assert_eq!(unit.regs().fsts() & fsts::ITE, 0);
        // The queue is usable once the device answers again.
        unit.time_outs.store(0, Ordering::SeqCst);
        q.submit(&unit, &unit.mem, &[dev_tlb()], false).unwrap();
        assert_eq!(
            kinds(&unit.take_log()),
            [InvDescType::DevIotlb, InvDescType::InvWait]
        );
    }

    /// After a completed wait the queue is known free: no IQH read for room, also when
    /// the tail wraps; after an error the next submission reads IQH again.
    #[test]
    fn a_completed_wait_frees_the_queue_without_an_iqh_read() {
        let (unit, mut q) = enabled();
        q.submit(&unit, &unit.mem, &[iotlb(0)], false).unwrap();
        let reads = unit.iqh_reads.load(Ordering::SeqCst);
        for i in 1..300 {
            q.submit(&unit, &unit.mem, &[iotlb(i)], false).unwrap();
        }
        assert_eq!(unit.iqh_reads.load(Ordering::SeqCst), reads);
        let log = unit.take_log();
        assert_eq!(log.len(), 600);
        assert!(log.chunks(2).zip(0..).all(|(pair, i)| pair[0] == iotlb(i)));
        *unit.reject.lock().unwrap() = Some(InvDescType::Iotlb);
        q.submit(&unit, &unit.mem, &[iotlb(1)], false).unwrap_err();
        let reads = unit.iqh_reads.load(Ordering::SeqCst);
        q.submit(&unit, &unit.mem, &[iotlb(2)], false).unwrap();
        assert!(unit.iqh_reads.load(Ordering::SeqCst) > reads);
    }

    #[test]
    fn a_unit_that_never_completes_is_reported() {
        let (unit, mut q) = enabled();
        unit.stuck.store(true, Ordering::SeqCst);
        assert_eq!(
            q.submit(&unit, &unit.mem, &[iotlb(1)], false),
            Err(Error::QueueTimeout)
        );
    }
}
