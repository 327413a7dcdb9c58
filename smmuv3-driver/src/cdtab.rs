//! Context-descriptor tables as the driver builds them (IHI 0070 §5.3;
//! `arm_smmu_alloc_cd_tables`): linear when the SMMU lacks IDR0.CD2L or the table needs at
//! most [`CTXDESC_L2_ENTRIES`] CDs, else 2-level with 64 KiB leaf tables made when a
//! SubstreamID is first used (`arm_smmu_get_cd_ptr`).

use vsva_mem::PhysMem;
use vsva_smmuv3::{cd::L1Cd, features::Features, ste::S1Fmt};

use crate::strtab::zero;
use crate::{DmaAlloc, Error};

/// CDs per leaf table of a 2-level CD table (Linux `CTXDESC_L2_ENTRIES`, split 10).
pub const CTXDESC_L2_ENTRIES: u64 = 1 << 10;

const CD_BYTES: u64 = 64;

/// A CD table: the STE's S1ContextPtr, S1Fmt and S1CDMax, and the leaves made so far.
#[derive(Debug, PartialEq, Eq)]
pub struct CdTable {
    base: u64,
    s1fmt: S1Fmt,
    s1cdmax: u8,
    /// Leaf tables by level-1 index (2-level), or empty (linear).
    leaves: Vec<Option<u64>>,
}

impl CdTable {
    /// A table for 2^`s1cdmax` SubstreamIDs (0: one CD, no substreams), cleared.
    pub fn new<M, A>(
        s1cdmax: u8,
        features: &Features,
        mem: &M,
        alloc: &mut A,
    ) -> Result<Self, Error>
    where
        M: PhysMem + ?Sized,
        A: DmaAlloc + ?Sized,
    {
        if s1cdmax > features.ssid_bits {
            return Err(Error::BadSubstreamId(1 << s1cdmax.min(31)));
        }
        let contexts = 1u64 << s1cdmax;
        let table = if !features.cd2l || contexts <= CTXDESC_L2_ENTRIES {
            CdTable {
                base: 0,
                s1fmt: S1Fmt::Linear,
                s1cdmax,
                leaves: Vec::new(),
            }
        } else {
            CdTable {
                base: 0,
                s1fmt: S1Fmt::TwoLevel64K,
                s1cdmax,
                leaves: vec![None; contexts.div_ceil(CTXDESC_L2_ENTRIES) as usize],
            }
        };
        let size = table.bytes();
        let base = alloc.alloc(size, size.max(64)).ok_or(Error::NoMemory)?;
        if let Err(e) = zero(mem, base, size) {
            alloc.free(base, size);
            return Err(e);
        }
        Ok(CdTable { base, ..table })
    }

    fn bytes(&self) -> u64 {
        match self.s1fmt {
            S1Fmt::Linear => CD_BYTES << self.s1cdmax,
            _ => self.leaves.len() as u64 * 8,
        }
    }

    /// STE.S1ContextPtr.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// STE.S1Fmt.
    pub fn s1fmt(&self) -> S1Fmt {
        self.s1fmt
    }

    /// STE.S1CDMax.
    pub fn s1cdmax(&self) -> u8 {
        self.s1cdmax
    }

    /// The address of CD `ssid` if its leaf exists.
    pub fn cd_address(&self, ssid: u32) -> Option<u64> {
        if (ssid as u64) >> self.s1cdmax != 0 {
            return None;
        }
        match self.s1fmt {
            S1Fmt::Linear => Some(self.base + ssid as u64 * CD_BYTES),
            _ => {
                let leaf = self.leaves[(ssid as u64 / CTXDESC_L2_ENTRIES) as usize]?;
                Some(leaf + (ssid as u64 % CTXDESC_L2_ENTRIES) * CD_BYTES)
            }
        }
    }

    /// The address of CD `ssid`, making its leaf first; true when a leaf was made (its
    /// L1CD then needs a CMD_CFGI_CD before use, `arm_smmu_sync_cd`).
    pub(crate) fn ensure_cd<M, A>(
        &mut self,
        ssid: u32,
        mem: &M,
        alloc: &mut A,
    ) -> Result<(u64, bool), Error>
    where
        M: PhysMem + ?Sized,
        A: DmaAlloc + ?Sized,
    {
        if (ssid as u64) >> self.s1cdmax != 0 {
            return Err(Error::BadSubstreamId(ssid));
        }
        let mut made = false;
        if self.s1fmt != S1Fmt::Linear && self.cd_address(ssid).is_none() {
            let size = CTXDESC_L2_ENTRIES * CD_BYTES;
            let leaf = alloc.alloc(size, size).ok_or(Error::NoMemory)?;
            let index = ssid as u64 / CTXDESC_L2_ENTRIES;
            let written = zero(mem, leaf, size)
                .and_then(|()| Ok(mem.write_u64(self.base + index * 8, L1Cd::new(leaf).0)?));
            if let Err(e) = written {
                alloc.free(leaf, size);
                return Err(e);
            }
            self.leaves[index as usize] = Some(leaf);
            made = true;
        }
        let addr = self.cd_address(ssid).ok_or(Error::BadSubstreamId(ssid))?;
        Ok((addr, made))
    }

    /// Gives the table and its leaves back (`arm_smmu_free_cd_tables`).
    pub fn free<A: DmaAlloc + ?Sized>(self, alloc: &mut A) {
        for leaf in self.leaves.iter().flatten() {
            alloc.free(*leaf, CTXDESC_L2_ENTRIES * CD_BYTES);
        }
        alloc.free(self.base, self.bytes());
    }
}
