//! The stream table as the driver builds it (IHI 0070 §5.1; `arm_smmu_init_strtab`):
//! linear, or 2-level with level-2 tables made when a stream is first used
//! (`arm_smmu_init_l2_strtab`), each filled with aborting STEs before its L1STD points to
//! it (`arm_smmu_init_bypass_stes` with `disable_bypass`).

use vsva_mem::PhysMem;
use vsva_smmuv3::{lookup::L1Std, ste::Config, ste::Ste};

use crate::{DmaAlloc, Error};

/// The StreamID bits a level-2 table covers (Linux `STRTAB_SPLIT`): 256 STEs, 16 KiB.
pub const STRTAB_SPLIT: u8 = 8;

/// Largest level-1 table, as log2 bytes (Linux `STRTAB_L1_SZ_SHIFT`).
const STRTAB_L1_SZ_SHIFT: u8 = 20;

const STE_BYTES: u64 = 64;

/// How the stream table is organised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StrtabFormat {
    /// One table of 2^SIDSIZE STEs (SMMUs without IDR0.ST_LEVEL 2-level support).
    Linear,
    /// Level-1 descriptors to level-2 tables of 2^[`STRTAB_SPLIT`] STEs.
    TwoLevel,
}

/// Clears `size` bytes at `addr`.
pub(crate) fn zero<M: PhysMem + ?Sized>(mem: &M, addr: u64, size: u64) -> Result<(), Error> {
    const CHUNK: [u8; 4096] = [0; 4096];
    let mut done = 0;
    while done < size {
        let n = (size - done).min(CHUNK.len() as u64);
        mem.write(addr + done, &CHUNK[..n as usize])?;
        done += n;
    }
    Ok(())
}

/// Writes the eight words of an STE (or CD) at `addr`.
pub(crate) fn write_words<M: PhysMem + ?Sized>(
    mem: &M,
    addr: u64,
    words: &[u64],
) -> Result<(), Error> {
    for (i, w) in words.iter().enumerate() {
        mem.write_u64(addr + 8 * i as u64, *w)?;
    }
    Ok(())
}

/// Reads the eight words at `addr`.
pub(crate) fn read_words<M: PhysMem + ?Sized>(mem: &M, addr: u64) -> Result<[u64; 8], Error> {
    let mut raw = [0; 8];
    for (i, w) in raw.iter_mut().enumerate() {
        *w = mem.read_u64(addr + 8 * i as u64)?;
    }
    Ok(raw)
}

/// The driver's stream table.
#[derive(Debug)]
pub(crate) struct StreamTable {
    base: u64,
    /// log2 of the StreamIDs covered.
    log2size: u8,
    split: Option<u8>,
    /// The level-2 tables by level-1 index (2-level), or empty (linear).
    l2: Vec<Option<u64>>,
}

impl StreamTable {
    fn bytes(&self) -> u64 {
        match self.split {
            None => STE_BYTES << self.log2size,
            Some(split) => 8 << (self.log2size - split),
        }
    }

    /// A table for `sid_bits` StreamIDs; every STE of a linear table aborts.
    pub(crate) fn new<M, A>(
        format: StrtabFormat,
        sid_bits: u8,
        mem: &M,
        alloc: &mut A,
    ) -> Result<Self, Error>
    where
        M: PhysMem + ?Sized,
        A: DmaAlloc + ?Sized,
    {
        let table = match format {
            StrtabFormat::Linear => StreamTable {
                base: 0,
                log2size: sid_bits,
                split: None,
                l2: Vec::new(),
            },
            StrtabFormat::TwoLevel => {
                // As many level-1 descriptors as SIDSIZE needs, at most 2^17 (1 MiB).
                let l1_bits = (STRTAB_L1_SZ_SHIFT - 3).min(sid_bits.saturating_sub(STRTAB_SPLIT));
                StreamTable {
                    base: 0,
                    log2size: l1_bits + STRTAB_SPLIT,
                    split: Some(STRTAB_SPLIT),
                    l2: vec![None; 1 << l1_bits],
                }
            }
        };
        let size = table.bytes();
        let base = alloc.alloc(size, size.max(64)).ok_or(Error::NoMemory)?;
        let table = StreamTable { base, ..table };
        let init = match table.split {
            None => fill_abort(mem, base, 1 << table.log2size),
            Some(_) => zero(mem, base, size),
        };
        if let Err(e) = init {
            alloc.free(base, size);
            return Err(e);
        }
        Ok(table)
    }

    /// A table that holds nothing (what is left after [`StreamTable::free`]).
    pub(crate) fn empty() -> Self {
        StreamTable {
            base: 0,
            log2size: 0,
            split: None,
            l2: Vec::new(),
        }
    }

    /// STRTAB_BASE (with RA) and STRTAB_BASE_CFG.
    pub(crate) fn registers(&self) -> (u64, u32) {
        let cfg = match self.split {
            None => self.log2size as u32,
            Some(split) => 1 << 16 | (split as u32) << 6 | self.log2size as u32,
        };
        (1 << 62 | self.base, cfg)
    }

    /// Whether `sid` is within the table.
    pub(crate) fn covers(&self, sid: u32) -> bool {
        (sid as u64) >> self.log2size == 0
    }

    /// The address of the STE of `sid` if its level-2 table exists.
    pub(crate) fn ste_address(&self, sid: u32) -> Option<u64> {
        if !self.covers(sid) {
            return None;
        }
        match self.split {
            None => Some(self.base + sid as u64 * STE_BYTES),
            Some(split) => {
                let l2 = self.l2[(sid >> split) as usize]?;
                Some(l2 + (sid as u64 & ((1 << split) - 1)) * STE_BYTES)
            }
        }
    }

    /// The address of the STE of `sid`, making its level-2 table first if needed.
    pub(crate) fn ensure_ste<M, A>(
        &mut self,
        sid: u32,
        mem: &M,
        alloc: &mut A,
    ) -> Result<u64, Error>
    where
        M: PhysMem + ?Sized,
        A: DmaAlloc + ?Sized,
    {
        if !self.covers(sid) {
            return Err(Error::BadStreamId(sid));
        }
        if let (Some(split), None) = (self.split, self.ste_address(sid)) {
            let size = STE_BYTES << split;
            let l2 = alloc.alloc(size, size).ok_or(Error::NoMemory)?;
            let l1 = self.base + (sid >> split) as u64 * 8;
            let made = fill_abort(mem, l2, 1 << split)
                .and_then(|()| Ok(mem.write_u64(l1, L1Std::new(l2, split + 1).0)?));
            if let Err(e) = made {
                alloc.free(l2, size);
                return Err(e);
            }
            self.l2[(sid >> split) as usize] = Some(l2);
        }
        self.ste_address(sid).ok_or(Error::BadStreamId(sid))
    }

    /// Gives every table back.
    pub(crate) fn free<A: DmaAlloc + ?Sized>(self, alloc: &mut A) {
        if let Some(split) = self.split {
            for l2 in self.l2.iter().flatten() {
                alloc.free(*l2, STE_BYTES << split);
            }
        }
        alloc.free(self.base, self.bytes());
    }

    /// The bytes of memory the table holds.
    pub(crate) fn footprint(&self) -> u64 {
        let l2 = self.split.map_or(0, |split| {
            self.l2.iter().flatten().count() as u64 * (STE_BYTES << split)
        });
        self.bytes() + l2
    }
}

/// Writes `n` aborting STEs from `addr`.
fn fill_abort<M: PhysMem + ?Sized>(mem: &M, addr: u64, n: u64) -> Result<(), Error> {
    let abort = Ste::new(Config::Abort).encode();
    for i in 0..n {
        write_words(mem, addr + i * STE_BYTES, &abort)?;
    }
    Ok(())
}
