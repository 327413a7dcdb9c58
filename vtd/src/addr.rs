//! Address and identifier types.
//!
//! Each address space has its own type so that a guest virtual address can never be passed
//! where a host physical one is expected. Identifiers are validated at construction.

use std::fmt;

macro_rules! address_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub u64);

        impl $name {
            /// The raw address.
            pub const fn raw(self) -> u64 {
                self.0
            }

            /// `self + offset`, or `None` on overflow.
            pub const fn checked_add(self, offset: u64) -> Option<Self> {
                match self.0.checked_add(offset) {
                    Some(a) => Some(Self(a)),
                    None => None,
                }
            }

            /// The offset of the address inside a page of `page_size` bytes (a power of two).
            pub const fn page_offset(self, page_size: u64) -> u64 {
                self.0 & (page_size - 1)
            }

            /// Whether the address is aligned to `align` (a power of two).
            pub const fn is_aligned(self, align: u64) -> bool {
                self.0 & (align - 1) == 0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, ":{:#x}"), self.0)
            }
        }
    };
}

address_type!(
    /// Guest virtual address: what a guest process (and its device, through SVA) uses.
    Gva,
    "gva"
);
address_type!(
    /// Guest physical address: the output of the guest's first level, input of the second.
    Gpa,
    "gpa"
);
address_type!(
    /// I/O virtual address: the address a device emits on a request without PASID.
    Iova,
    "iova"
);
address_type!(
    /// Host physical address: an offset into the host memory file.
    Hpa,
    "hpa"
);

/// A Process Address Space ID: 20 bits (VT-d 3.0 §3.4.1; PCIe PASID TLP prefix).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pasid(u32);

/// A PASID value that does not fit in 20 bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("PASID {0:#x} does not fit in 20 bits")]
pub struct InvalidPasid(pub u32);

impl Pasid {
    /// Number of PASID bits the PCIe PASID prefix carries.
    pub const BITS: u32 = 20;
    /// The largest PASID.
    pub const MAX: Pasid = Pasid((1 << Self::BITS) - 1);
    /// The PASID that requests without PASID use in scalable mode (RID_PASID, programmed to 0
    /// by Linux in the scalable-mode context entry).
    pub const RID_PASID: Pasid = Pasid(0);

    /// A PASID from its raw value, checked to fit in 20 bits.
    pub const fn new(raw: u32) -> Result<Self, InvalidPasid> {
        if raw > Self::MAX.0 {
            Err(InvalidPasid(raw))
        } else {
            Ok(Pasid(raw))
        }
    }

    /// The PASID in bits 19:0 of `bits`, the bits above ignored: what a 20-bit PASID field
    /// of an entry, descriptor or register holds once shifted down.
    pub const fn from_low_bits(bits: u64) -> Self {
        Pasid((bits & Self::MAX.0 as u64) as u32)
    }

    /// The raw 20-bit value.
    pub const fn raw(self) -> u32 {
        self.0
    }

    /// Index into the PASID directory (bits 19:6).
    pub const fn dir_index(self) -> usize {
        (self.0 >> 6) as usize
    }

    /// Index into a PASID table (bits 5:0).
    pub const fn table_index(self) -> usize {
        (self.0 & 0x3f) as usize
    }
}

impl TryFrom<u32> for Pasid {
    type Error = InvalidPasid;

    fn try_from(raw: u32) -> Result<Self, InvalidPasid> {
        Pasid::new(raw)
    }
}

impl fmt::Display for Pasid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pasid:{:#x}", self.0)
    }
}

/// A domain identifier: tags cache entries of one second-level address space (VT-d §6.2.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DomainId(pub u16);

impl fmt::Display for DomainId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "did:{}", self.0)
    }
}

/// The requester id of a PCI function: bus, device, function (VT-d §3.4.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceId(u16);

impl SourceId {
    /// A source id from bus, device (5 bits) and function (3 bits); `None` when out of range.
    pub const fn new(bus: u8, dev: u8, func: u8) -> Option<Self> {
        if dev > 31 || func > 7 {
            None
        } else {
            Some(SourceId(
                ((bus as u16) << 8) | ((dev as u16) << 3) | func as u16,
            ))
        }
    }

    /// A source id from its 16-bit requester-id form.
    pub const fn from_rid(rid: u16) -> Self {
        SourceId(rid)
    }

    /// The 16-bit requester id.
    pub const fn rid(self) -> u16 {
        self.0
    }

    /// Bus number: the root-table index.
    pub const fn bus(self) -> u8 {
        (self.0 >> 8) as u8
    }

    /// Device and function, together: the context-table index (§3.4.3).
    pub const fn devfn(self) -> u8 {
        self.0 as u8
    }

    /// Device number.
    pub const fn dev(self) -> u8 {
        (self.0 >> 3) as u8 & 0x1f
    }

    /// Function number.
    pub const fn func(self) -> u8 {
        self.0 as u8 & 0x7
    }
}

impl fmt::Display for SourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus(), self.dev(), self.func())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pasid_range_is_twenty_bits() {
        assert_eq!(Pasid::new(0xf_ffff).unwrap().raw(), 0xf_ffff);
        assert_eq!(Pasid::new(0x10_0000), Err(InvalidPasid(0x10_0000)));
        assert_eq!(Pasid::from_low_bits(0xabc_def0_1234_5678), Pasid(0x4_5678));
        assert_eq!(Pasid::from_low_bits(0x10_0000), Pasid(0));
        let p = Pasid::new(0x12345).unwrap();
        assert_eq!(p.dir_index(), 0x12345 >> 6);
        assert_eq!(p.table_index(), 0x05);
    }

    #[test]
    fn source_id_layout() {
        let s = SourceId::new(0x3a, 0x1f, 0x7).unwrap();
        assert_eq!(s.rid(), 0x3aff);
        assert_eq!(s.to_string(), "3a:1f.7");
        assert!(SourceId::new(0, 32, 0).is_none());
        assert!(SourceId::new(0, 0, 8).is_none());
    }

    proptest! {
        #[test]
        fn source_id_round_trips(bus: u8, dev in 0u8..32, func in 0u8..8) {
            let s = SourceId::new(bus, dev, func).unwrap();
            prop_assert_eq!((s.bus(), s.dev(), s.func()), (bus, dev, func));
            prop_assert_eq!(SourceId::from_rid(s.rid()), s);
        }
    }
}
