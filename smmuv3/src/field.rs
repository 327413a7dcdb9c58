//! Bit-field helpers shared by the descriptor and structure formats.

/// Bits `hi..=lo` set.
pub(crate) const fn bits(hi: u32, lo: u32) -> u64 {
    (u64::MAX >> (63 - hi)) & (u64::MAX << lo)
}

/// The field `hi..=lo` of `value`, shifted down.
pub(crate) const fn get(value: u64, hi: u32, lo: u32) -> u64 {
    (value & bits(hi, lo)) >> lo
}

/// `field` placed at `hi..=lo` (bits of `field` that do not fit are dropped).
pub(crate) const fn put(field: u64, hi: u32, lo: u32) -> u64 {
    (field << lo) & bits(hi, lo)
}

/// Declares a fieldless enum whose variants name the values of one field (each variant
/// `= value`), with `from_bits`, the variant a field value names (`None` for a reserved
/// value), and `raw`, the variant's field value.
macro_rules! field_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $value:literal, )+
        }
    ) => {
        $(#[$meta])*
        $vis enum $name {
            $( $(#[$vmeta])* $variant = $value, )+
        }

        impl $name {
            /// The variant a field value names, or `None` for a reserved value.
            pub const fn from_bits(bits: u64) -> Option<Self> {
                match bits {
                    $( $value => Some(Self::$variant), )+
                    _ => None,
                }
            }

            /// The field value.
            pub const fn raw(self) -> u64 {
                self as u64
            }
        }
    };
}
pub(crate) use field_enum;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_and_fields() {
        assert_eq!(bits(47, 12), 0x0000_ffff_ffff_f000);
        assert_eq!(bits(63, 0), u64::MAX);
        assert_eq!(get(0xabcd_0000, 31, 16), 0xabcd);
        assert_eq!(put(0x1ff, 7, 4), 0xf0);
    }
}
