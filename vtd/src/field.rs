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

/// Declares a fieldless enum whose variants name the values of one field of an entry,
/// descriptor or register (each variant `= value`), with `from_bits`, the variant a field
/// value names (`None` for a reserved value), and `raw`, the variant's field value.
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
    fn masks_and_flags() {
        assert_eq!(bits(51, 12), 0x000f_ffff_ffff_f000);
        assert_eq!(bits(63, 0), u64::MAX);
        assert_eq!(bits(5, 5), 1 << 5);
        assert_eq!(flag(true, 1 << 9), 1 << 9);
        assert_eq!(flag(false, 1 << 9), 0);
    }

    field_enum! {
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        enum Sample {
            Low = 0,
            High = 0xf,
        }
    }

    #[test]
    fn field_enum_maps_values_both_ways() {
        for bits in 0..=0x1f {
            let expected = match bits {
                0 => Some(Sample::Low),
                0xf => Some(Sample::High),
                _ => None,
            };
            assert_eq!(Sample::from_bits(bits), expected);
            if let Some(v) = expected {
                assert_eq!(v.raw(), bits);
            }
        }
    }
}
