//! The SMMU capabilities that stream table entries and context descriptors are checked
//! against: the fields of SMMU_IDR0, IDR1 and IDR5 that decide whether an STE or CD is
//! ILLEGAL (IHI 0070 §6.3).
//!
//! The vsva SMMU walks AArch64 little-endian tables and always has the 4 KiB granule
//! (IDR0.TTF = AArch64, IDR0.TTENDIAN = little-endian, IDR5.GRAN4K), so those are not
//! options; the 16 KiB and 64 KiB granules are.

use crate::field::field_enum;
use crate::ste::Granule;
use crate::walk::AddressSize;

field_enum! {
    /// IDR0.HTTU: hardware translation table update support.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
    pub enum Httu {
        /// No hardware updates: HA/HD are ignored.
        None = 0,
        /// Access flag updates (HA).
        Access = 1,
        /// Access flag and dirty state updates (HA, HD).
        AccessDirty = 2,
    }
}

field_enum! {
    /// IDR0.STALL_MODEL: which fault behaviours a stream may choose.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub enum StallModel {
        /// Stall and terminate are both supported.
        StallAndTerminate = 0,
        /// Only terminate: STE.S2S, STE.S1STALLD and CD.S must be 0.
        Terminate = 1,
        /// Stall is forced: STE.S2S and CD.S must be 1 (and S1STALLD 0).
        ForceStall = 2,
    }
}

/// The capabilities an STE or CD is checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Features {
    /// IDR0.S1P: stage-1 translation.
    pub s1p: bool,
    /// IDR0.S2P: stage-2 translation.
    pub s2p: bool,
    /// IDR0.CD2L: two-level CD tables.
    pub cd2l: bool,
    /// IDR0.VMID16: 16-bit VMIDs (else 8).
    pub vmid16: bool,
    /// IDR0.ASID16: 16-bit ASIDs (else 8).
    pub asid16: bool,
    /// IDR0.ATS: PCIe ATS.
    pub ats: bool,
    /// IDR0.NS1ATS: split-stage ATS is not supported.
    pub ns1ats: bool,
    /// IDR0.Hyp: EL2 stage-1 contexts (STRW = EL2) and the CMD_TLBI_EL2_* commands.
    pub hyp: bool,
    /// IDR0.PRI: the Page Request Interface (PRI queue, CMD_PRI_RESP).
    pub pri: bool,
    /// IDR3.RIL: range invalidations (the NUM and SCALE fields of CMD_TLBI_*).
    pub ril: bool,
    /// IDR0.HTTU.
    pub httu: Httu,
    /// IDR0.STALL_MODEL.
    pub stall_model: StallModel,
    /// IDR1.SSIDSIZE: the number of SubstreamID bits (0 to 20).
    pub ssid_bits: u8,
    /// IDR1.SIDSIZE: the number of StreamID bits (0 to 32).
    pub sid_bits: u8,
    /// IDR5.OAS: the output address size.
    pub oas: AddressSize,
    /// IDR5.GRAN16K: the 16 KiB translation granule.
    pub gran16k: bool,
    /// IDR5.GRAN64K: the 64 KiB translation granule.
    pub gran64k: bool,
}

impl Features {
    /// What the vsva SMMU implements: both stages, 2-level CD tables, 16-bit VMIDs and
    /// ASIDs, ATS (with split-stage), PRI, no EL2 contexts, no range invalidation, A and D
    /// updates, terminate only, 20-bit SubstreamIDs, 16-bit StreamIDs, 48-bit output
    /// addresses, the 4 KiB, 16 KiB and 64 KiB granules.
    pub const VSVA: Features = Features {
        s1p: true,
        s2p: true,
        cd2l: true,
        vmid16: true,
        asid16: true,
        ats: true,
        ns1ats: false,
        hyp: false,
        pri: true,
        ril: false,
        httu: Httu::AccessDirty,
        stall_model: StallModel::Terminate,
        ssid_bits: 20,
        sid_bits: 16,
        oas: AddressSize::Bits48,
        gran16k: true,
        gran64k: true,
    };

    /// The effective (HA, HD) of a structure asking for `ha` and `hd`: what HTTU supports,
    /// and HD only with HA.
    pub const fn hardware_updates(&self, ha: bool, hd: bool) -> (bool, bool) {
        let ha = ha && !matches!(self.httu, Httu::None);
        let hd = hd && ha && matches!(self.httu, Httu::AccessDirty);
        (ha, hd)
    }

    /// Whether the SMMU implements `granule` (IDR5.GRAN4K/16K/64K).
    pub const fn has_granule(&self, granule: Granule) -> bool {
        match granule {
            Granule::Size4K => true,
            Granule::Size16K => self.gran16k,
            Granule::Size64K => self.gran64k,
        }
    }

    /// Whether OAS is 52 bits (the SMMU's FEAT_LPA: 64 KiB-granule level-1 blocks).
    pub const fn lpa(&self) -> bool {
        matches!(self.oas, AddressSize::Bits52)
    }

    /// The smaller of `size` and OAS.
    pub const fn cap_oas(&self, size: AddressSize) -> AddressSize {
        if size.raw() > self.oas.raw() {
            self.oas
        } else {
            size
        }
    }
}
