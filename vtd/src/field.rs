//! Bit-field helpers shared by the entry, descriptor and register formats.

/// Bits `hi..=lo` set.
pub(crate) const fn bits(hi: u32, lo: u32) -> u64 {
    (u64::MAX >> (63 - hi)) & (u64::MAX << lo)
}

/// `mask` when `set`, else 0: a one-bit flag of an encoded entry.
pub(crate) const fn flag(set: bool, mask: u64) -> u64 {
    if set {
        mask
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_and_flags() {
        assert_eq!(bits(51, 12), 0x000f_ffff_ffff_f000);
        assert_eq!(bits(63, 0), u64::MAX);
        assert_eq!(bits(5, 5), 1 << 5);
        assert_eq!(flag(true, 1 << 9), 1 << 9);
        assert_eq!(flag(false, 1 << 9), 0);
    }
}
