//! The page request queue, the software side (VT-d §7.5), as intel-iommu's
//! `prq_event_thread` (v5.10) takes requests: clear PRS.PPR first (so a request queued
//! from then on raises a new event), take every descriptor from PQH to PQT, move PQH to
//! PQT, then clear PRS.PRO if the queue overflowed meanwhile. What a request means, and
//! who answers it, is the user's policy; [`group_response`] is the answer's descriptor.

use vsva_mem::PhysMem;
use vsva_vtd::inv_desc::ResponseCode;
use vsva_vtd::prq::PageRequestDesc;
use vsva_vtd::regs::layout::{offset, pq};
use vsva_vtd::{addr::Pasid, inv_desc::InvDesc};

use crate::{Error, Registers};

/// PQA_REG.PQS: the queue is `2^PQS` pages (`PRQ_ORDER`), 128 descriptors.
pub const PRQ_ORDER: u64 = 0;
/// Bytes of the queue memory, naturally aligned.
pub const PRQ_BYTES: u64 = 4096 << PRQ_ORDER;
/// The byte offsets PQH and PQT can take in this queue (`PRQ_RING_MASK`).
const RING_MASK: u64 = PRQ_BYTES - pq::DESC_SIZE;

/// The driver's side of a page request queue. The memory ([`PRQ_BYTES`], aligned to its
/// size) belongs to the user, who frees it once the unit no longer writes it.
#[derive(Debug)]
pub struct PageRequestRing {
    base: u64,
}

impl PageRequestRing {
    /// The queue at `base`.
    pub fn new(base: u64) -> Self {
        PageRequestRing { base }
    }

    /// The queue memory.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The PQA_REG value: base and size.
    pub fn pqa(&self) -> u64 {
        self.base | PRQ_ORDER
    }

    /// `intel_svm_enable_prq`: PQH = PQT = 0, then PQA_REG.
    pub fn enable<R: Registers + ?Sized>(&self, regs: &R) -> Result<(), Error> {
        regs.write(offset::PQH, 8, 0)?;
        regs.write(offset::PQT, 8, 0)?;
        regs.write(offset::PQA, 8, self.pqa())?;
        Ok(())
    }

    /// Takes every descriptor the unit queued, oldest first, as `prq_event_thread` does:
    /// clears PRS.PPR, hands each descriptor from PQH to PQT (both taken within the queue,
    /// as Linux masks them) to `handle`, then moves PQH to PQT and clears PRS.PRO if set
    /// (v5.10 clears it whether or not the queue is empty). A descriptor that cannot be
    /// read or decoded is handed over as its error. Returns how many were taken.
    pub fn drain<R, M, F>(&self, regs: &R, mem: &M, mut handle: F) -> Result<usize, Error>
    where
        R: Registers + ?Sized,
        M: PhysMem + ?Sized,
        F: FnMut(Result<PageRequestDesc, Error>),
    {
        regs.write(offset::PRS, 4, pq::PPR.into())?;
        let tail = regs.read(offset::PQT, 8)? & RING_MASK;
        let mut head = regs.read(offset::PQH, 8)? & RING_MASK;
        let mut taken = 0;
        while head != tail {
            handle(self.read_desc(mem, head));
            taken += 1;
            head = (head + pq::DESC_SIZE) & RING_MASK;
        }
        regs.write(offset::PQH, 8, tail)?;
        if regs.read32(offset::PRS)? & pq::PRO != 0 {
            clear_overflow(regs)?;
        }
        Ok(taken)
    }

    #[inline]
    fn read_desc<M: PhysMem + ?Sized>(&self, mem: &M, at: u64) -> Result<PageRequestDesc, Error> {
        let mut raw = [0u64; 4];
        for (i, q) in raw.iter_mut().enumerate() {
            *q = mem.read_u64(self.base + at + 8 * i as u64)?;
        }
        Ok(PageRequestDesc::decode(raw)?)
    }
}

/// Clears PRS.PRO after a drain found it set: out of line, as an overflow is rare, so the
/// drain's code stays dense in the instruction cache.
#[cold]
#[inline(never)]
fn clear_overflow<R: Registers + ?Sized>(regs: &R) -> Result<(), Error> {
    tracing::info!("vt-d: page request queue overflow");
    regs.write(offset::PRS, 4, pq::PRO.into())?;
    Ok(())
}

/// How many times a PASID teardown drains page requests again because PRS.PRO is still
/// set after its draining wait (`intel_svm_drain_prq` repeats for as long as PRO is set): a
/// device that keeps the queue overflowing must not hold an unbind for ever, so after this
/// many the teardown goes on, logged.
pub const PRO_RETRIES: usize = 8;

/// The page group response to `req` with `code` (§6.5.2.9), when the device waits for one
/// (§7.5.1: the last request of its group, LPIG, or one with private data, PDP): its
/// requester, PASID, group index and LPIG, and its private data returned.
pub fn group_response(req: &PageRequestDesc, code: ResponseCode) -> Option<InvDesc> {
    (req.lpig || req.private_data.is_some()).then(|| InvDesc::PageGroupResponse {
        rid: req.rid,
        pasid_present: req.pasid.is_some(),
        pasid: req.pasid.unwrap_or(Pasid::RID_PASID),
        private_data_present: req.private_data.is_some(),
        response: code,
        last_page_in_group: req.lpig,
        prg_index: req.prg_index,
        private_data: req.private_data.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testunit::Unit;
    use vsva_vtd::addr::SourceId;

    const QUEUE: u64 = 0x4_0000;

    fn request(i: u16, lpig: bool) -> PageRequestDesc {
        PageRequestDesc {
            rid: SourceId::from_rid(0x10),
            pasid: Some(Pasid::new(7).unwrap()),
            exe: false,
            pm: false,
            read: true,
            write: false,
            lpig,
            prg_index: i,
            addr: 0x1000 * u64::from(i),
            private_data: None,
        }
    }

    /// Queues `req` as the unit does when a device sends one; false when the queue is
    /// full (the unit then sets PRO).
    fn send(unit: &Unit, req: &PageRequestDesc) -> bool {
        let mut regs = unit.regs();
        let Some(slot) = regs.pq_tail_slot() else {
            regs.pq_overflow();
            return false;
        };
        for (i, q) in req.encode().iter().enumerate() {
            unit.mem.write_u64(slot + 8 * i as u64, *q).unwrap();
        }
        regs.pq_advance_tail().unwrap();
        true
    }

    /// Drains the queue; every descriptor must decode.
    fn drain(unit: &Unit, q: &PageRequestRing) -> Vec<u16> {
        let mut got = Vec::new();
        let n = q
            .drain(unit, &unit.mem, |r| got.push(r.unwrap().prg_index))
            .unwrap();
        assert_eq!(n, got.len());
        got
    }

    #[test]
    fn drains_in_order_across_the_wrap() {
        let unit = Unit::new();
        let q = PageRequestRing::new(QUEUE);
        q.enable(&unit).unwrap();
        for round in 0..3u16 {
            for i in 0..50 {
                assert!(send(&unit, &request(round * 50 + i, false)));
            }
            let got = drain(&unit, &q);
            assert_eq!(got, (round * 50..round * 50 + 50).collect::<Vec<_>>());
            let regs = unit.regs();
            assert_eq!(regs.prs() & pq::PPR, 0);
            let ring = regs.page_request_queue().unwrap();
            assert_eq!(ring.head, ring.tail);
        }
        assert!(drain(&unit, &q).is_empty());
    }

    #[test]
    fn an_overflow_is_cleared_and_the_queued_requests_kept() {
        let unit = Unit::new();
        let q = PageRequestRing::new(QUEUE);
        q.enable(&unit).unwrap();
        // 128 slots hold 127 requests; the 128th overflows.
        let sent = (0..128).filter(|&i| send(&unit, &request(i, true))).count();
        assert_eq!(sent, 127);
        assert_ne!(unit.regs().prs() & pq::PRO, 0);
        let got = drain(&unit, &q);
        assert_eq!(got, (0..127).collect::<Vec<_>>());
        assert_eq!(unit.regs().prs() & (pq::PRO | pq::PPR), 0);
        // The queue takes requests again.
        assert!(send(&unit, &request(300, true)));
        assert_eq!(drain(&unit, &q), [300]);
    }

    #[test]
    fn a_bad_descriptor_is_taken_and_reported() {
        let unit = Unit::new();
        let q = PageRequestRing::new(QUEUE);
        q.enable(&unit).unwrap();
        send(&unit, &request(1, true));
        unit.mem.write_u64(QUEUE, 0xf).unwrap();
        send(&unit, &request(2, true));
        let mut got = Vec::new();
        assert_eq!(q.drain(&unit, &unit.mem, |r| got.push(r)).unwrap(), 2);
        assert!(matches!(got[0], Err(Error::PageRequest(_))));
        assert_eq!(got[1].unwrap().prg_index, 2);
    }

    #[test]
    fn responses_go_to_groups_that_wait_for_one() {
        assert_eq!(
            group_response(&request(3, false), ResponseCode::Success),
            None
        );
        let mut r = request(3, false);
        r.private_data = Some([1, 2]);
        let Some(InvDesc::PageGroupResponse {
            private_data_present: true,
            private_data: [1, 2],
            last_page_in_group: false,
            prg_index: 3,
            response: ResponseCode::InvalidRequest,
            ..
        }) = group_response(&r, ResponseCode::InvalidRequest)
        else {
            panic!("no response with the private data");
        };
    }
}
