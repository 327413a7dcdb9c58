//! Writing the scalable-mode structures above the page tables (VT-d §3.4.3, §9.4, §9.5):
//! root, context and PASID entries, and the size of a PASID directory. Which tables exist
//! and when they are freed is the user's bookkeeping; how an entry is written is shared.
//!
//! Entries are written with P last when made present and P first when cleared, so the
//! unit never reads a half-written present entry (as `context_set_present` and
//! `pasid_set_present` come last in intel-iommu).

use vsva_vtd::pasid::PASID_ENTRY_SIZE;
use vsva_vtd::{Pasid, PasidEntry, PhysMem};

use crate::Error;

/// PDTS of a PASID directory covering `pasid_bits` bits of PASID (at most 20): `2^(PDTS +
/// 7)` entries of 64 PASIDs each, and never less than one page, as
/// `intel_pasid_alloc_table` sizes the directory and `context_pdts` encodes it.
pub fn pdts_for(pasid_bits: u32) -> u8 {
    let dir_bits = pasid_bits.min(Pasid::BITS).saturating_sub(6);
    (dir_bits.max(9) - 7).min(7) as u8
}

/// Bytes of a PASID directory of `pdts`: `2^(PDTS + 7)` entries of 8 bytes.
pub fn pasid_dir_bytes(pdts: u8) -> u64 {
    8 << (u32::from(pdts) + 7)
}

/// Makes the entry at `addr` present with `raw`: every other qword, then qword 0 (P).
pub fn write_entry<M: PhysMem + ?Sized>(mem: &M, addr: u64, raw: &[u64]) -> Result<(), Error> {
    for (i, q) in raw.iter().enumerate().skip(1) {
        mem.write_u64(addr + 8 * i as u64, *q)?;
    }
    if let Some(q0) = raw.first() {
        mem.write_u64(addr, *q0)?;
    }
    Ok(())
}

/// Clears the `qwords`-qword entry at `addr`: qword 0 (P) first.
pub fn clear_entry<M: PhysMem + ?Sized>(mem: &M, addr: u64, qwords: u64) -> Result<(), Error> {
    for i in 0..qwords {
        mem.write_u64(addr + 8 * i, 0)?;
    }
    Ok(())
}

/// The PASID entry at `slot`: `None` when it is not present, cannot be read or does not
/// decode.
pub fn read_pasid_entry<M: PhysMem + ?Sized>(mem: &M, slot: u64) -> Option<PasidEntry> {
    let mut raw = [0u64; 8];
    for (i, q) in raw.iter_mut().enumerate() {
        *q = mem.read_u64(slot + 8 * i as u64).ok()?;
    }
    PasidEntry::from_raw(raw).ok()
}

/// Makes the PASID entry at `slot` present with `entry`.
pub fn write_pasid_entry<M: PhysMem + ?Sized>(
    mem: &M,
    slot: u64,
    entry: &PasidEntry,
) -> Result<(), Error> {
    write_entry(mem, slot, &entry.to_raw())
}

/// Clears the PASID entry at `slot`.
pub fn clear_pasid_entry<M: PhysMem + ?Sized>(mem: &M, slot: u64) -> Result<(), Error> {
    clear_entry(mem, slot, PASID_ENTRY_SIZE / 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_cover_the_pasids_in_at_least_a_page() {
        assert_eq!(pdts_for(20), 7);
        assert_eq!(pasid_dir_bytes(7), 128 << 10);
        assert_eq!(pdts_for(19), 6);
        assert_eq!(pdts_for(10), 2);
        assert_eq!(pasid_dir_bytes(2), 4096);
        assert_eq!(pdts_for(0), 2);
        assert_eq!(pdts_for(32), 7);
    }
}
