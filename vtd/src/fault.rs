//! Fault reasons of scalable-mode DMA remapping (VT-d §7.1.3, table "Scalable-Mode Address
//! Translation Faults").
//!
//! Each non-recoverable fault condition has a name of the form `GROUP.n` and an 8-bit reason
//! code that hardware records in the FR field of a fault recording register. Several
//! sub-conditions of one condition (for example the `SCT.4.x` family) share a single code, so
//! they are one variant here.
//!
//! Groups: RTA (root-table address register), SRT (scalable-mode root table), SCT (context
//! table), SPD (PASID directory), SPT (PASID table), SFL (first-level tables), SSL
//! (second-level tables), SGN (general, checked on the final translation).

use std::fmt;

macro_rules! fault_reasons {
    ($($(#[$doc:meta])* $variant:ident = $code:literal, $name:literal, $text:literal;)*) => {
        /// A scalable-mode non-recoverable address translation fault condition.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum FaultReason {
            $($(#[$doc])* $variant,)*
        }

        impl FaultReason {
            /// Every condition, in the order of the spec's table.
            pub const ALL: &'static [FaultReason] = &[$(FaultReason::$variant,)*];

            /// The reason code recorded in the fault recording register (FRCD_REG.FR).
            pub const fn code(&self) -> u8 {
                match self {
                    $(FaultReason::$variant => $code,)*
                }
            }

            /// The spec's name of the condition, such as `"SFL.2"`.
            pub const fn name(&self) -> &'static str {
                match self {
                    $(FaultReason::$variant => $name,)*
                }
            }

            /// A one-line description of the condition.
            pub const fn description(&self) -> &'static str {
                match self {
                    $(FaultReason::$variant => $text,)*
                }
            }

            /// The condition a reason code stands for, if the code is a scalable-mode
            /// translation fault reason.
            pub const fn from_code(code: u8) -> Option<Self> {
                match code {
                    $($code => Some(FaultReason::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

fault_reasons! {
    /// RTA.1: the root-table address register holds an invalid root-table address.
    Rta1 = 0x30, "RTA.1", "invalid root-table address in RTADDR_REG";
    /// RTA.2: a request with PASID arrived while RTADDR_REG.TTM selects legacy mode.
    Rta2 = 0x31, "RTA.2", "request with PASID while translation table mode is legacy";
    /// RTA.3: a page request arrived while RTADDR_REG.TTM selects legacy mode.
    Rta3 = 0x32, "RTA.3", "page request while translation table mode is legacy";

    /// SRT.1: hardware could not read the scalable-mode root entry.
    Srt1 = 0x38, "SRT.1", "error accessing the root entry";
    /// SRT.2: the present bit (UP/LP) of the scalable-mode root entry half is clear.
    Srt2 = 0x39, "SRT.2", "root entry not present";
    /// SRT.3: a present scalable-mode root entry has a reserved bit set.
    Srt3 = 0x3a, "SRT.3", "non-zero reserved field in the root entry";

    /// SCT.1: hardware could not read the scalable-mode context entry.
    Sct1 = 0x40, "SCT.1", "error accessing the context entry";
    /// SCT.2: the present bit of the context entry is clear.
    Sct2 = 0x41, "SCT.2", "context entry not present";
    /// SCT.3: a present context entry has a reserved bit set.
    Sct3 = 0x42, "SCT.3", "non-zero reserved field in the context entry";
    /// SCT.4.x: a present context entry is programmed with an invalid value (for example a
    /// PASID directory pointer above the host address width).
    Sct4 = 0x43, "SCT.4", "invalid programming of the context entry";
    /// SCT.5: a translation request arrived but the context entry's DTE field is clear.
    Sct5 = 0x44, "SCT.5", "translation request with device-TLB disabled (DTE clear)";
    /// SCT.6: a request with PASID arrived but the context entry's PASIDE field is clear.
    Sct6 = 0x45, "SCT.6", "request with PASID while PASID is disabled (PASIDE clear)";
    /// SCT.7: the request's PASID is beyond the PASID directory size (PDTS).
    Sct7 = 0x46, "SCT.7", "PASID larger than the PASID directory covers";
    /// SCT.8: a page request arrived but the context entry's PRE field is clear.
    Sct8 = 0x47, "SCT.8", "page request while page requests are disabled (PRE clear)";
    /// SCT.9: the RID_PASID field of the context entry is invalid for a request without PASID.
    Sct9 = 0x48, "SCT.9", "invalid RID_PASID field in the context entry";

    /// SPD.1: hardware could not read the PASID directory entry.
    Spd1 = 0x50, "SPD.1", "error accessing the PASID directory entry";
    /// SPD.2: the present bit of the PASID directory entry is clear.
    Spd2 = 0x51, "SPD.2", "PASID directory entry not present";
    /// SPD.3: a present PASID directory entry has a reserved bit set.
    Spd3 = 0x52, "SPD.3", "non-zero reserved field in the PASID directory entry";

    /// SPT.1: hardware could not read the PASID table entry.
    Spt1 = 0x58, "SPT.1", "error accessing the PASID table entry";
    /// SPT.2: the present bit of the PASID table entry is clear.
    Spt2 = 0x59, "SPT.2", "PASID table entry not present";
    /// SPT.3: a present PASID table entry has a reserved bit set.
    Spt3 = 0x5a, "SPT.3", "non-zero reserved field in the PASID table entry";
    /// SPT.4.x: a present PASID table entry is programmed with an invalid value (reserved
    /// PGTT, AW or FLPM encoding, a table pointer above the host address width, ...).
    Spt4 = 0x5b, "SPT.4", "invalid programming of the PASID table entry";
    /// SPT.5: an execute request arrived but the PASID entry's ERE field is clear.
    Spt5 = 0x5c, "SPT.5", "execute request while execute requests are disabled (ERE clear)";
    /// SPT.6: a supervisor request arrived but the PASID entry's SRE field is clear.
    Spt6 = 0x5d, "SPT.6", "supervisor request while supervisor requests are disabled (SRE clear)";

    /// SFL.1: hardware could not read a first-level paging entry below the root table.
    Sfl1 = 0x70, "SFL.1", "error accessing a first-level paging entry";
    /// SFL.2: the present bit of a first-level paging entry is clear.
    Sfl2 = 0x71, "SFL.2", "first-level paging entry not present";
    /// SFL.3: a present first-level paging entry has a reserved bit set.
    Sfl3 = 0x72, "SFL.3", "non-zero reserved field in a first-level paging entry";
    /// SFL.4: hardware could not read the root-level (PML5/PML4) entry through FLPTPTR.
    Sfl4 = 0x73, "SFL.4", "error accessing the first-level root table (FLPTPTR)";
    /// SFL.5: in nested translation, a first-level table pointer or output address is beyond
    /// what the second level translates.
    Sfl5 = 0x74, "SFL.5", "first-level address beyond the second-level width (nested)";
    /// SFL.6: in nested translation, the second level denies reading the first-level root
    /// table.
    Sfl6 = 0x75, "SFL.6", "no second-level read permission for the first-level root table (nested)";
    /// SFL.7: in nested translation, the second level denies reading a first-level table
    /// below the root.
    Sfl7 = 0x76, "SFL.7", "no second-level read permission for a first-level table (nested)";
    /// SFL.8: in nested translation, the second level denies the write needed to set the
    /// accessed or dirty bit of a first-level entry.
    Sfl8 = 0x77, "SFL.8", "no second-level write permission for a first-level A/D update (nested)";
    /// SFL.9: a first-level accessed/dirty update is needed in an entry set up for no-snoop.
    Sfl9 = 0x90, "SFL.9", "first-level A/D update needed with no-snoop set up";
    /// SFL.10: the accessed/dirty update of a first-level entry failed.
    Sfl10 = 0x91, "SFL.10", "first-level A/D update failed";

    /// SSL.1: hardware could not read a second-level paging entry.
    Ssl1 = 0x78, "SSL.1", "error accessing a second-level paging entry";
    /// SSL.2: a second-level paging entry grants neither read nor write (not present).
    Ssl2 = 0x79, "SSL.2", "second-level paging entry not present (R and W clear)";
    /// SSL.3: a present second-level paging entry has a reserved bit set.
    Ssl3 = 0x7a, "SSL.3", "non-zero reserved field in a second-level paging entry";
    /// SSL.4: the second-level page-table pointer (SLPTPTR) is invalid.
    Ssl4 = 0x7b, "SSL.4", "invalid second-level page-table pointer";
    /// SSL.5: a second-level accessed/dirty update is needed in an entry set up for no-snoop.
    Ssl5 = 0x7c, "SSL.5", "second-level A/D update needed with no-snoop set up";

    /// SGN.1: the input address of a first-level translation is not canonical.
    Sgn1 = 0x80, "SGN.1", "non-canonical input address for first-level translation";
    /// SGN.2: a user request reached a first-level page that is supervisor-only (U/S clear).
    Sgn2 = 0x81, "SGN.2", "user request to a supervisor-only first-level page";
    /// SGN.3: an execute request reached a page without execute permission.
    Sgn3 = 0x82, "SGN.3", "no execute permission";
    /// SGN.4.x: the input address is beyond the translation's address width.
    Sgn4 = 0x83, "SGN.4", "input address beyond the address width";
    /// SGN.5: a second-level entry points beyond the host address width.
    Sgn5 = 0x84, "SGN.5", "second-level entry address beyond the host address width";
    /// SGN.6: a write or atomic request reached a page without write permission.
    Sgn6 = 0x85, "SGN.6", "no write permission";
    /// SGN.7: a read or atomic request reached a page without read permission.
    Sgn7 = 0x86, "SGN.7", "no read permission";
    /// SGN.8: the translated address falls in the interrupt address range (0xFEEx_xxxx).
    Sgn8 = 0x87, "SGN.8", "output address in the interrupt address range";
}

impl fmt::Display for FaultReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({:#04x}): {}",
            self.name(),
            self.code(),
            self.description()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::FaultReason::{self, *};

    #[test]
    fn codes_match_the_spec_table() {
        let table: &[(FaultReason, u8, &str)] = &[
            (Rta1, 0x30, "RTA.1"),
            (Srt2, 0x39, "SRT.2"),
            (Sct4, 0x43, "SCT.4"),
            (Sct9, 0x48, "SCT.9"),
            (Spd2, 0x51, "SPD.2"),
            (Spt4, 0x5b, "SPT.4"),
            (Spt6, 0x5d, "SPT.6"),
            (Sfl1, 0x70, "SFL.1"),
            (Sfl2, 0x71, "SFL.2"),
            (Sfl8, 0x77, "SFL.8"),
            (Sfl9, 0x90, "SFL.9"),
            (Sfl10, 0x91, "SFL.10"),
            (Ssl1, 0x78, "SSL.1"),
            (Ssl3, 0x7a, "SSL.3"),
            (Sgn1, 0x80, "SGN.1"),
            (Sgn6, 0x85, "SGN.6"),
            (Sgn7, 0x86, "SGN.7"),
        ];
        for &(reason, code, name) in table {
            assert_eq!(reason.code(), code, "{name}");
            assert_eq!(reason.name(), name);
            assert_eq!(FaultReason::from_code(code), Some(reason));
        }
    }

    #[test]
    fn codes_are_unique_and_round_trip() {
        for (i, a) in FaultReason::ALL.iter().enumerate() {
            assert_eq!(FaultReason::from_code(a.code()), Some(*a));
            for b in &FaultReason::ALL[i + 1..] {
                assert_ne!(a.code(), b.code(), "{a:?} and {b:?} share a code");
            }
        }
    }

    #[test]
    fn unknown_codes_are_rejected() {
        for code in [0x00, 0x01, 0x0d, 0x2f, 0x34, 0x49, 0x5e, 0x6f, 0x92, 0xff] {
            assert_eq!(FaultReason::from_code(code), None, "{code:#x}");
        }
    }

    #[test]
    fn display_names_code_and_condition() {
        assert_eq!(
            Sfl2.to_string(),
            "SFL.2 (0x71): first-level paging entry not present"
        );
    }
}
