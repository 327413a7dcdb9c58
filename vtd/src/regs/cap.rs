//! The capability (CAP_REG, VT-d §10.4.2) and extended capability (ECAP_REG, §10.4.3)
//! registers: what a remapping unit implements.
//!
//! Fields hold the raw register encodings (MGAW is the width minus one, FRO and IRO count
//! 16-byte units); helper methods give the derived values.

use super::RegError;

/// A value that one register field holds.
trait FieldValue: Copy {
    fn to_bits(self) -> u64;
    fn from_bits(bits: u64) -> Self;
}

impl FieldValue for bool {
    fn to_bits(self) -> u64 {
        self as u64
    }
    fn from_bits(bits: u64) -> Self {
        bits != 0
    }
}

impl FieldValue for u8 {
    fn to_bits(self) -> u64 {
        self as u64
    }
    fn from_bits(bits: u64) -> Self {
        bits as u8
    }
}

impl FieldValue for u16 {
    fn to_bits(self) -> u64 {
        self as u64
    }
    fn from_bits(bits: u64) -> Self {
        bits as u16
    }
}

macro_rules! capability_register {
    (
        $(#[$doc:meta])*
        $name:ident {
            $($(#[$fdoc:meta])* $field:ident: $ty:ty = $lo:literal, $width:literal;)*
        }
    ) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
        pub struct $name {
            $($(#[$fdoc])* pub $field: $ty,)*
        }

        impl $name {
            /// Decodes a register value; reserved bits are ignored.
            pub fn from_raw(raw: u64) -> Self {
                Self {
                    $($field: <$ty as FieldValue>::from_bits((raw >> $lo) & ((1u64 << $width) - 1)),)*
                }
            }

            /// The register value; fails when a field does not fit its bits.
            pub fn to_raw(&self) -> Result<u64, RegError> {
                let mut raw = 0;
                $(
                    let value = self.$field.to_bits();
                    if value >> $width != 0 {
                        return Err(RegError::FieldRange {
                            register: stringify!($name),
                            field: stringify!($field),
                            value,
                        });
                    }
                    raw |= value << $lo;
                )*
                Ok(raw)
            }
        }
    };
}

capability_register! {
    /// Capability register (CAP_REG, §10.4.2).
    Cap {
        /// Number of domains supported: 2^(4 + 2·ND).
        nd: u8 = 0, 3;
        /// Advanced fault logging.
        afl: bool = 3, 1;
        /// Required write-buffer flushing.
        rwbf: bool = 4, 1;
        /// Protected low-memory region.
        plmr: bool = 5, 1;
        /// Protected high-memory region.
        phmr: bool = 6, 1;
        /// Caching mode: not-present and erroneous entries may be cached (virtual units).
        cm: bool = 7, 1;
        /// Supported adjusted guest address widths: bit 1 = 39-bit (3-level), bit 2 =
        /// 48-bit (4-level), bit 3 = 57-bit (5-level) second-level tables.
        sagaw: u8 = 8, 5;
        /// Maximum guest address width, minus one.
        mgaw: u8 = 16, 6;
        /// Zero-length reads are supported.
        zlr: bool = 22, 1;
        /// Fault-recording register offset, in 16-byte units.
        fro: u16 = 24, 10;
        /// Second-level large page support: bit 0 = 2 MiB, bit 1 = 1 GiB.
        sllps: u8 = 34, 4;
        /// Page-selective invalidation.
        psi: bool = 39, 1;
        /// Number of fault-recording registers, minus one.
        nfr: u8 = 40, 8;
        /// Maximum address mask value of page-selective invalidations.
        mamv: u8 = 48, 6;
        /// Write draining.
        dwd: bool = 54, 1;
        /// Read draining.
        drd: bool = 55, 1;
        /// First-level 1-GiB pages.
        fl1gp: bool = 56, 1;
        /// Posted interrupts.
        pi: bool = 59, 1;
        /// First-level 5-level paging.
        fl5lp: bool = 60, 1;
    }
}

capability_register! {
    /// Extended capability register (ECAP_REG, §10.4.3).
    Ecap {
        /// Page-walk coherency (legacy mode).
        c: bool = 0, 1;
        /// Queued invalidation.
        qi: bool = 1, 1;
        /// Device-TLBs (ATS).
        dt: bool = 2, 1;
        /// Interrupt remapping.
        ir: bool = 3, 1;
        /// Extended interrupt mode (x2APIC).
        eim: bool = 4, 1;
        /// Pass-through translation.
        pt: bool = 6, 1;
        /// Snoop control.
        sc: bool = 7, 1;
        /// IOTLB register offset, in 16-byte units.
        iro: u16 = 8, 10;
        /// Maximum handle mask value (interrupt entry cache invalidation).
        mhmv: u8 = 20, 4;
        /// Memory type support.
        mts: bool = 25, 1;
        /// Nested translation.
        nest: bool = 26, 1;
        /// Page requests.
        prs: bool = 29, 1;
        /// Execute requests.
        ers: bool = 30, 1;
        /// Supervisor requests.
        srs: bool = 31, 1;
        /// No-write flag.
        nwfs: bool = 33, 1;
        /// Extended accessed flag.
        eafs: bool = 34, 1;
        /// PASID size supported, minus one.
        pss: u8 = 35, 5;
        /// Requests with PASID.
        pasid: bool = 40, 1;
        /// Device-TLB invalidation throttle.
        dit: bool = 41, 1;
        /// Page-request drain.
        pds: bool = 42, 1;
        /// Scalable-mode translation.
        smts: bool = 43, 1;
        /// Virtual command registers.
        vcs: bool = 44, 1;
        /// Second-level accessed/dirty bits.
        slads: bool = 45, 1;
        /// Second-level translation.
        slts: bool = 46, 1;
        /// First-level translation.
        flts: bool = 47, 1;
        /// Scalable-mode page-walk coherency.
        smpwcs: bool = 48, 1;
        /// RID_PASID field of the scalable-mode context entry.
        rps: bool = 49, 1;
        /// Abort-DMA translation table mode.
        adms: bool = 52, 1;
    }
}

impl Cap {
    /// Number of domain ids.
    pub const fn domains(&self) -> u32 {
        1 << (4 + 2 * self.nd as u32)
    }

    /// Maximum guest address width in bits.
    pub const fn guest_address_width(&self) -> u32 {
        self.mgaw as u32 + 1
    }

    /// Byte offset of the first fault recording register.
    pub const fn fault_recording_offset(&self) -> u64 {
        self.fro as u64 * 16
    }

    /// Number of fault recording registers.
    pub const fn fault_recording_count(&self) -> usize {
        self.nfr as usize + 1
    }
}

impl Ecap {
    /// Byte offset of the IOTLB registers (IVA_REG, then IOTLB_REG).
    pub const fn iotlb_offset(&self) -> u64 {
        self.iro as u64 * 16
    }

    /// Number of PASID bits supported.
    pub const fn pasid_bits(&self) -> u32 {
        self.pss as u32 + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cap_layout() {
        let cap = Cap {
            nd: 6,
            sagaw: 0b100,
            mgaw: 47,
            fro: 0x22,
            nfr: 3,
            psi: true,
            mamv: 18,
            ..Cap::default()
        };
        assert_eq!(cap.to_raw().unwrap(), 0x0012_0380_222f_0406);
        let cap = Cap {
            afl: true,
            rwbf: true,
            cm: true,
            zlr: true,
            sllps: 0b11,
            dwd: true,
            drd: true,
            fl1gp: true,
            pi: true,
            fl5lp: true,
            ..Cap::default()
        };
        assert_eq!(cap.to_raw().unwrap(), 0x19c0_000c_0040_0098);
        assert_eq!(
            Cap::from_raw(0x0012_0380_222f_0406).fault_recording_offset(),
            0x220
        );
        assert_eq!(
            Cap::from_raw(0x0012_0380_222f_0406).fault_recording_count(),
            4
        );
        assert_eq!(Cap::from_raw(0x0012_0380_222f_0406).domains(), 65536);
        assert_eq!(
            Cap::from_raw(0x0012_0380_222f_0406).guest_address_width(),
            48
        );
    }

    #[test]
    fn ecap_layout() {
        let ecap = Ecap {
            qi: true,
            dt: true,
            iro: 0xf,
            pss: 19,
            pasid: true,
            smts: true,
            vcs: true,
            flts: true,
            slts: true,
            nest: true,
            prs: true,
            srs: true,
            ..Ecap::default()
        };
        assert_eq!(ecap.to_raw().unwrap(), 0x0000_d998_a400_0f06);
        assert_eq!(ecap.iotlb_offset(), 0xf0);
        assert_eq!(ecap.pasid_bits(), 20);
        let ecap = Ecap {
            c: true,
            ir: true,
            eim: true,
            pt: true,
            sc: true,
            mhmv: 0xf,
            mts: true,
            ers: true,
            nwfs: true,
            eafs: true,
            dit: true,
            pds: true,
            slads: true,
            smpwcs: true,
            rps: true,
            adms: true,
            ..Ecap::default()
        };
        assert_eq!(ecap.to_raw().unwrap(), 0x0013_2606_42f0_00d9);
    }

    #[test]
    fn fields_that_do_not_fit_are_rejected() {
        let cap = Cap {
            nd: 7,
            fro: 0x400,
            ..Cap::default()
        };
        assert_eq!(
            cap.to_raw(),
            Err(RegError::FieldRange {
                register: "Cap",
                field: "fro",
                value: 0x400
            })
        );
        let ecap = Ecap {
            pss: 32,
            ..Ecap::default()
        };
        assert!(matches!(
            ecap.to_raw(),
            Err(RegError::FieldRange { field: "pss", .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Decoding keeps every defined bit; only reserved bits are dropped.
        #[test]
        fn raw_round_trips(raw: u64) {
            let cap = Cap::from_raw(raw);
            prop_assert_eq!(Cap::from_raw(cap.to_raw().unwrap()), cap);
            let ecap = Ecap::from_raw(raw);
            prop_assert_eq!(Ecap::from_raw(ecap.to_raw().unwrap()), ecap);
            // Reserved bits: CAP 15:13, 23, 38, 58:57, 63:61; ECAP 5, 19:18, 24, 28:27,
            // 32, 51:50, 63:53.
            prop_assert_eq!(cap.to_raw().unwrap(), raw & !0xe600_0040_0080_e000);
            prop_assert_eq!(ecap.to_raw().unwrap(), raw & !0xffec_0001_190c_0020);
        }
    }
}
