//! What the vIOMMU advertises to the guest (CAP_REG §10.4.2, ECAP_REG §10.4.3).
//!
//! The guest sees a scalable-mode unit with first-level translation only: its first level
//! (GVA → GPA) is what the host nests over its own second level (GPA → HPA), so second
//! level, nesting and pass-through are not offered. Caching mode (CAP.CM) is set, as on
//! every virtual VT-d that shadows: it makes the guest driver invalidate after it makes an
//! entry present (Linux `pasid_flush_caches`), which is when the vIOMMU reads the entry.

use vsva_vtd::{
    flpte::FlFormat, flpte::InvalidAddressWidth, regs::Cap, regs::Ecap, root::Capabilities,
};

/// PASID width the vIOMMU supports: ECAP.PSS + 1.
pub const PASID_BITS: u32 = 20;
/// Offset of the IOTLB registers, in 16-byte units (ECAP.IRO).
const IRO: u16 = 0x50;
/// Offset of the fault recording registers, in 16-byte units (CAP.FRO).
const FRO: u16 = 0x40;
/// Number of fault recording registers, minus one (CAP.NFR).
const NFR: u8 = 7;

/// The guest-visible capabilities the vIOMMU can vary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VIommuConfig {
    /// Guest physical address width (CAP.MGAW + 1): first-level tables and pages must lie
    /// below `2^gaw`.
    pub gaw: u8,
    /// CAP.FL5LP: 5-level first-level paging (57-bit guest virtual addresses).
    pub fl5lp: bool,
    /// ECAP.EAFS: the extended-accessed flag (PASID entry EAFE).
    pub eafs: bool,
    /// ECAP.MTS: memory-type fields in the PASID entry (CD, EMTE, EMT, PWT, PCD, PAT).
    pub mts: bool,
}

impl Default for VIommuConfig {
    /// 48-bit guest physical addresses, 4- and 5-level first-level paging, no extended
    /// accessed flag, no memory types.
    fn default() -> Self {
        VIommuConfig {
            gaw: 48,
            fl5lp: true,
            eafs: false,
            mts: false,
        }
    }
}

impl VIommuConfig {
    /// The first-level entry format of the guest's tables: `gaw`-bit outputs, 1-GiB pages.
    pub fn fl_format(&self) -> Result<FlFormat, InvalidAddressWidth> {
        FlFormat::new(self.gaw, true)
    }

    /// CAP_REG: caching mode, page-selective invalidation (mask up to 2^18 pages), 1-GiB
    /// first-level pages, 64Ki domains, 8 fault recording registers. SAGAW lists 48-bit
    /// tables although second-level translation is not offered: drivers refuse a unit
    /// without one (Linux `iommu_calculate_agaw`).
    pub fn cap(&self) -> Cap {
        Cap {
            nd: 6,
            cm: true,
            sagaw: 0b0100,
            mgaw: self.gaw.saturating_sub(1),
            fro: FRO,
            psi: true,
            nfr: NFR,
            mamv: 18,
            dwd: true,
            drd: true,
            fl1gp: true,
            fl5lp: self.fl5lp,
            ..Cap::default()
        }
    }

    /// ECAP_REG: scalable mode, first-level translation, 20-bit PASIDs, queued
    /// invalidation, device TLBs, page requests, supervisor and execute requests, and the
    /// virtual command interface for PASID allocation.
    pub fn ecap(&self) -> Ecap {
        Ecap {
            qi: true,
            dt: true,
            iro: IRO,
            mts: self.mts,
            prs: true,
            ers: true,
            srs: true,
            eafs: self.eafs,
            pss: (PASID_BITS - 1) as u8,
            pasid: true,
            smts: true,
            vcs: true,
            flts: true,
            ..Ecap::default()
        }
    }

    /// The same capabilities as the table checks see them.
    pub fn capabilities(&self) -> Capabilities {
        Capabilities {
            haw: self.gaw,
            sagaw: self.cap().sagaw,
            fl5lp: self.fl5lp,
            flts: true,
            slts: false,
            nest: false,
            pt: false,
            pasid: true,
            dt: true,
            prs: true,
            srs: true,
            ers: true,
            slads: false,
            eafs: self.eafs,
            sc: false,
            smpwc: false,
            mts: self.mts,
        }
    }
}
