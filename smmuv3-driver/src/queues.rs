//! The output queues as their consumer sees them (IHI 0070 §3.5, §7, §8): records between
//! CONS and PROD are read and CONS moved past them; an overflow (PROD.OVFLG differing from
//! CONS.OVACKFLG) is reported and acknowledged by copying OVFLG into CONS, as
//! `queue_sync_prod_in` and `queue_sync_cons_ovf` do.

use vsva_mem::PhysMem;
use vsva_smmuv3::regs::Queue;
use vsva_smmuv3::regs::OVERFLOW;

use crate::{Error, Registers};

/// What one drain of an output queue found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drained<T> {
    /// The records, oldest first.
    pub records: Vec<T>,
    /// Records that could not be decoded (logged and skipped).
    pub unknown: usize,
    /// The SMMU lost records since the last drain because the queue was full.
    pub overflowed: bool,
}

impl<T> Default for Drained<T> {
    fn default() -> Self {
        Drained {
            records: Vec::new(),
            unknown: 0,
            overflowed: false,
        }
    }
}

/// The consumer side of the event queue or the PRI queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutputQueue {
    queue: Queue,
    entry_bytes: u64,
    prod_reg: u64,
    cons_reg: u64,
}

impl OutputQueue {
    /// A queue of 2^`log2size` entries of `entry_bytes` at `base`, whose PROD and CONS
    /// registers are at `prod_reg` and `cons_reg`.
    pub fn new(base: u64, log2size: u8, entry_bytes: u64, prod_reg: u64, cons_reg: u64) -> Self {
        OutputQueue {
            queue: Queue {
                base,
                log2size,
                prod: 0,
                cons: 0,
            },
            entry_bytes,
            prod_reg,
            cons_reg,
        }
    }

    /// The queue's base address and log2 size.
    pub fn base(&self) -> (u64, u8) {
        (self.queue.base, self.queue.log2size)
    }

    /// Reads every waiting record, decoded by `decode` (`None`: undecodable), and
    /// publishes the new CONS.
    pub fn drain<R, M, T, const N: usize>(
        &mut self,
        regs: &R,
        mem: &M,
        decode: impl Fn([u64; N]) -> Option<T>,
    ) -> Result<Drained<T>, Error>
    where
        R: Registers,
        M: PhysMem + ?Sized,
    {
        let mask = (2u32 << self.queue.log2size) - 1;
        let prod = regs.read32(self.prod_reg)?;
        let cons = regs.read32(self.cons_reg)?;
        let mut out = Drained {
            records: Vec::new(),
            unknown: 0,
            overflowed: (prod ^ cons) & OVERFLOW != 0,
        };
        if out.overflowed {
            tracing::warn!(
                reg = self.prod_reg,
                "SMMU queue overflow: records were lost"
            );
        }
        self.queue.prod = prod & mask;
        self.queue.cons = cons & mask;
        while !self.queue.is_empty() {
            let addr = self.queue.entry_address(self.queue.cons, self.entry_bytes);
            let mut raw = [0u64; N];
            for (i, w) in raw.iter_mut().enumerate() {
                *w = mem.read_u64(addr + 8 * i as u64)?;
            }
            match decode(raw) {
                Some(r) => out.records.push(r),
                None => {
                    tracing::warn!(?raw, "SMMU queue record not understood");
                    out.unknown += 1;
                }
            }
            self.queue.cons = self.queue.next(self.queue.cons);
        }
        regs.write(
            self.cons_reg,
            4,
            ((prod & OVERFLOW) | self.queue.cons) as u64,
        )?;
        Ok(out)
    }
}
