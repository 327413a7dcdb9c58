//! The scalable-mode root table (VT-d §3.4.3, §9.2) and what the table walk above the PASID
//! table shares: the capabilities entries are checked against, and faults with their FPD.
//!
//! The root table is one 4 KiB page of 256 root entries, one per bus, at the address in
//! RTADDR_REG. A scalable-mode root entry (128 bits) points to two context tables: the lower
//! one for device functions 0-127 and the upper one for 128-255 (§3.4.3).

use crate::addr::SourceId;
use crate::fault::FaultReason;
use crate::regs::{Cap, Ecap};
use vsva_mem::PhysMem;

/// Size of a scalable-mode root entry in bytes.
pub const ROOT_ENTRY_SIZE: u64 = 16;

/// The address bits of a 4 KiB aligned table pointer (bits 63:12).
pub(crate) const PTR_MASK: u64 = !0xfff;

/// LP in the lower half and UP in the upper half.
const PRESENT: u64 = 1;
/// Bits 11:1 of each half are reserved.
const HALF_RESERVED: u64 = 0xffe;

/// What a remapping unit supports, as far as it decides whether a table entry is valid.
///
/// The fields carry the names of the Capability Register (CAP_REG, §10.4.2) and Extended
/// Capability Register (ECAP_REG, §10.4.3) fields, plus the host address width that the
/// platform reports (DMAR ACPI table, §8.1). A field of an entry that is tied to a capability
/// the unit lacks is treated as reserved, as the spec says for each such field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Host address width: table pointers at or above `1 << haw` are invalid.
    pub haw: u8,
    /// CAP.SAGAW: bit n set means second-level tables with AW = n are supported.
    pub sagaw: u8,
    /// CAP.FL5LP: 5-level first-level paging.
    pub fl5lp: bool,
    /// ECAP.FLTS: first-level translation.
    pub flts: bool,
    /// ECAP.SLTS: second-level translation.
    pub slts: bool,
    /// ECAP.NEST: nested translation.
    pub nest: bool,
    /// ECAP.PT: pass-through.
    pub pt: bool,
    /// ECAP.PASID: requests with PASID.
    pub pasid: bool,
    /// ECAP.DT: device-TLBs (ATS).
    pub dt: bool,
    /// ECAP.PRS: page requests.
    pub prs: bool,
    /// ECAP.SRS: supervisor requests.
    pub srs: bool,
    /// ECAP.ERS: execute requests.
    pub ers: bool,
    /// ECAP.SLADS: second-level accessed/dirty bits.
    pub slads: bool,
    /// ECAP.EAFS: extended accessed flag.
    pub eafs: bool,
    /// ECAP.SC: snoop control (the PGSNP field).
    pub sc: bool,
    /// ECAP.SMPWC: snooped page walks in scalable mode (the PWSNP field).
    pub smpwc: bool,
    /// ECAP.MTS: memory type support (CD, EMTE, EMT, PWT, PCD, PAT).
    pub mts: bool,
}

impl Capabilities {
    /// A unit with every feature an entry can name, host address width `haw` and the
    /// second-level table depths `sagaw` lists (CAP.SAGAW).
    pub const fn full(haw: u8, sagaw: u8) -> Self {
        Capabilities {
            haw,
            sagaw,
            fl5lp: true,
            flts: true,
            slts: true,
            nest: true,
            pt: true,
            pasid: true,
            dt: true,
            prs: true,
            srs: true,
            ers: true,
            slads: true,
            eafs: true,
            sc: true,
            smpwc: true,
            mts: true,
        }
    }

    /// What a unit's capability registers say, with the guest address width (CAP.MGAW + 1)
    /// standing in for the host address width, which the registers do not hold.
    pub const fn from_registers(cap: &Cap, ecap: &Ecap) -> Self {
        Capabilities {
            haw: cap.guest_address_width() as u8,
            sagaw: cap.sagaw,
            fl5lp: cap.fl5lp,
            flts: ecap.flts,
            slts: ecap.slts,
            nest: ecap.nest,
            pt: ecap.pt,
            pasid: ecap.pasid,
            dt: ecap.dt,
            prs: ecap.prs,
            srs: ecap.srs,
            ers: ecap.ers,
            slads: ecap.slads,
            eafs: ecap.eafs,
            sc: ecap.sc,
            smpwc: ecap.smpwcs,
            mts: ecap.mts,
        }
    }

    /// Whether a 4 KiB aligned pointer lies beyond the host address width.
    pub(crate) const fn beyond_haw(&self, ptr: u64) -> bool {
        self.haw < 64 && ptr >> self.haw != 0
    }
}

/// The capability checks of root, context and PASID table entries as masks, built once
/// per unit from its [`Capabilities`] (when they are set), so that an entry read on a miss
/// is checked by masked compares on its raw words (§9.2, §9.4, §9.6): a bit reserved
/// without its capability is one more bit of the reserved mask, and a pointer beyond the
/// host address width one of the bits above it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryChecks {
    pub(crate) caps: Capabilities,
    /// The bits of a 4 KiB aligned table pointer beyond the host address width.
    pub(crate) beyond_haw: u64,
    /// Context-entry qword 0 bits that must be clear: 8:5, and DTE, PASIDE and PRE without
    /// ECAP.DT, PASID and PRS (SCT.3).
    pub(crate) context_rsvd0: u64,
    /// PASID-entry qwords 0-2 bits that must be clear: the reserved fields, and the fields
    /// reserved without their capability (SPT.3).
    pub(crate) pasid_rsvd: [u64; 3],
    /// By PASID-entry PGTT value: the bits of qwords 0 and 2 beyond the host address width
    /// (SLPTPTR with a second level, FLPTPTR with a first level only; SPT.4).
    pub(crate) pasid_pointers: [[u64; 2]; 8],
    /// By PGTT value: the AW and FLPM values an entry of that type may have, bit
    /// `4 * AW + FLPM`; none for a PGTT the unit lacks (SPT.4).
    pub(crate) pasid_modes: [u32; 8],
}

impl EntryChecks {
    /// The checks of a unit with capabilities `caps`.
    pub const fn new(caps: &Capabilities) -> Self {
        let beyond_haw = if caps.haw < 64 {
            PTR_MASK & (!0 << caps.haw)
        } else {
            0
        };
        EntryChecks {
            caps: *caps,
            beyond_haw,
            context_rsvd0: crate::context::reserved0(caps),
            pasid_rsvd: crate::pasid::reserved(caps),
            pasid_pointers: crate::pasid::pointer_limits(beyond_haw),
            pasid_modes: crate::pasid::modes(caps),
        }
    }

    /// The capabilities the checks were built from.
    pub const fn capabilities(&self) -> &Capabilities {
        &self.caps
    }
}

/// A fault found while walking the tables, with the fault processing disable (FPD) that
/// applies to it: the OR of the FPD fields of the context, PASID-directory and PASID-table
/// entries read so far, present or not (§7.1.2). Faults above the context entry have none.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}{}", if *fpd { " (FPD set)" } else { "" })]
pub struct EntryFault {
    /// The fault condition.
    pub reason: FaultReason,
    /// Whether recording the fault is disabled by an FPD field on the way.
    pub fpd: bool,
}

impl EntryFault {
    pub(crate) const fn new(reason: FaultReason, fpd: bool) -> Self {
        EntryFault { reason, fpd }
    }
}

impl From<FaultReason> for EntryFault {
    fn from(reason: FaultReason) -> Self {
        EntryFault { reason, fpd: false }
    }
}

/// Address of the root entry of `bus` in the root table at `rta` (RTADDR_REG.RTA; the low 12
/// bits, where the register keeps TTM, are ignored).
pub const fn root_entry_addr(rta: u64, bus: u8) -> u64 {
    (rta & PTR_MASK) + bus as u64 * ROOT_ENTRY_SIZE
}

/// A scalable-mode root entry (§9.2): the lower and upper context-table pointers, `None` when
/// the half's present bit (LP, UP) is clear.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ScalableRootEntry {
    /// LCTP: the context table for device functions 0-127, when LP is set.
    pub lctp: Option<u64>,
    /// UCTP: the context table for device functions 128-255, when UP is set.
    pub uctp: Option<u64>,
}

/// Encodes one half of a root entry.
const fn encode_half(ctp: Option<u64>) -> u64 {
    match ctp {
        Some(ptr) => (ptr & PTR_MASK) | PRESENT,
        None => 0,
    }
}

/// Decodes one half of a root entry, checking its reserved bits when it is present.
const fn decode_half(raw: u64) -> Result<Option<u64>, FaultReason> {
    if raw & PRESENT == 0 {
        Ok(None)
    } else if raw & HALF_RESERVED != 0 {
        Err(FaultReason::Srt3)
    } else {
        Ok(Some(raw & PTR_MASK))
    }
}

impl ScalableRootEntry {
    /// The two 64-bit halves: lower (LP, LCTP) then upper (UP, UCTP).
    pub const fn to_raw(&self) -> [u64; 2] {
        [encode_half(self.lctp), encode_half(self.uctp)]
    }

    /// Decodes a root entry; a present half with a reserved bit set gives SRT.3. The bits of
    /// a half that is not present are ignored.
    pub const fn from_raw(raw: [u64; 2]) -> Result<Self, FaultReason> {
        let lctp = match decode_half(raw[0]) {
            Ok(half) => half,
            Err(e) => return Err(e),
        };
        let uctp = match decode_half(raw[1]) {
            Ok(half) => half,
            Err(e) => return Err(e),
        };
        Ok(ScalableRootEntry { lctp, uctp })
    }

    /// The context table that holds `devfn`'s entry: LCTP below 128, UCTP from 128 (§3.4.3).
    /// A clear present bit gives SRT.2, a pointer beyond the host address width SRT.3.
    pub const fn context_table(&self, devfn: u8, caps: &Capabilities) -> Result<u64, FaultReason> {
        checked_ctp(if devfn < 128 { self.lctp } else { self.uctp }, caps)
    }
}

/// The context-table pointer of a decoded half, checked for presence and address width.
const fn checked_ctp(half: Option<u64>, caps: &Capabilities) -> Result<u64, FaultReason> {
    match half {
        None => Err(FaultReason::Srt2),
        Some(ptr) if caps.beyond_haw(ptr) => Err(FaultReason::Srt3),
        Some(ptr) => Ok(ptr),
    }
}

/// Reads the two halves of `bus`'s root entry; a failed read gives SRT.1.
pub fn read_root_entry(mem: &impl PhysMem, rta: u64, bus: u8) -> Result<[u64; 2], FaultReason> {
    let mut raw = [0; 2];
    mem.read_u64s(root_entry_addr(rta, bus), &mut raw)
        .map_err(|_| FaultReason::Srt1)?;
    Ok(raw)
}

/// The context table that holds `sid`'s context entry, as hardware finds it from the root
/// table at `rta`. Only the half of the root entry that serves `sid` is checked, so a bad
/// upper half does not fault requests of device functions below 128.
pub fn context_table_addr(
    mem: &impl PhysMem,
    rta: u64,
    sid: SourceId,
    caps: &Capabilities,
) -> Result<u64, FaultReason> {
    let raw = read_root_entry(mem, rta, sid.bus())?;
    let half = decode_half(raw[(sid.devfn() >= 128) as usize])?;
    checked_ctp(half, caps)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testutil::TestMemory;
    use proptest::prelude::*;

    /// A unit that supports everything, with a 46-bit host address width.
    pub(crate) const CAPS: Capabilities = Capabilities::full(46, 0b0_1110);
    /// Its entry checks.
    pub(crate) const CHECKS: EntryChecks = EntryChecks::new(&CAPS);

    /// Any unit: each capability on (mostly, so that entries reach the later checks) or
    /// off, a host address width and any SAGAW.
    pub(crate) fn any_caps() -> impl Strategy<Value = Capabilities> {
        let on = prop::bool::weighted(0.85);
        let haw = prop_oneof![Just(39u8), Just(46), Just(52), Just(64)];
        (prop::array::uniform15(on), haw, any::<u8>()).prop_map(|(b, haw, sagaw)| Capabilities {
            haw,
            sagaw,
            fl5lp: b[0],
            flts: b[1],
            slts: b[2],
            nest: b[3],
            pt: b[4],
            pasid: b[5],
            dt: b[6],
            prs: b[7],
            srs: b[8],
            ers: b[9],
            slads: b[10],
            eafs: b[11],
            sc: b[12],
            smpwc: b[13],
            mts: b[14],
        })
    }

    /// Flips up to three bits of `raw`, mostly in its first `near` qwords.
    pub(crate) fn flipped<const N: usize>(
        raw: impl Strategy<Value = [u64; N]>,
        near: usize,
    ) -> impl Strategy<Value = [u64; N]> {
        let flip = prop_oneof![(0..near, 0u32..64), (0..N, 0u32..64)];
        (raw, prop::collection::vec(flip, 0..4)).prop_map(|(mut raw, flips)| {
            for (q, b) in flips {
                raw[q] ^= 1 << b;
            }
            raw
        })
    }

    /// Writes consecutive qwords from `addr`.
    pub(crate) fn put(mem: &impl PhysMem, addr: u64, qwords: &[u64]) {
        for (i, q) in qwords.iter().enumerate() {
            mem.write_u64(addr + 8 * i as u64, *q).unwrap();
        }
    }

    #[test]
    fn capabilities_from_registers() {
        let cap = Cap {
            mgaw: 47,
            sagaw: 0b0100,
            fl5lp: true,
            ..Cap::default()
        };
        let ecap = Ecap {
            flts: true,
            pasid: true,
            smpwcs: true,
            mts: true,
            ..Ecap::default()
        };
        let expected = Capabilities {
            haw: 48,
            sagaw: 0b0100,
            fl5lp: true,
            flts: true,
            slts: false,
            nest: false,
            pt: false,
            pasid: true,
            dt: false,
            prs: false,
            srs: false,
            ers: false,
            slads: false,
            eafs: false,
            sc: false,
            smpwc: true,
            mts: true,
        };
        assert_eq!(Capabilities::from_registers(&cap, &ecap), expected);
    }

    #[test]
    fn root_entry_address_per_bus() {
        assert_eq!(root_entry_addr(0x1000, 0), 0x1000);
        assert_eq!(root_entry_addr(0x1000, 5), 0x1050);
        assert_eq!(root_entry_addr(0x7_f000, 0xff), 0x7_fff0);
        // RTADDR_REG keeps TTM (bits 11:10) in the low bits: ignored for the address.
        assert_eq!(root_entry_addr(0x2000 | 0x400, 1), 0x2010);
    }

    #[test]
    fn encodes_the_spec_layout() {
        let entry = ScalableRootEntry {
            lctp: Some(0x1234_5000),
            uctp: Some(0xab_c000),
        };
        assert_eq!(entry.to_raw(), [0x1234_5001, 0xab_c001]);
        assert_eq!(
            ScalableRootEntry::from_raw([0x1234_5001, 0xab_c001]),
            Ok(entry)
        );

        let lower_only = ScalableRootEntry {
            lctp: Some(0x3_0000_0000),
            uctp: None,
        };
        assert_eq!(lower_only.to_raw(), [0x3_0000_0001, 0]);
        assert_eq!(
            ScalableRootEntry::from_raw([0x3_0000_0001, 0]),
            Ok(lower_only)
        );
    }

    #[test]
    fn each_reserved_bit_of_a_present_half_faults_srt3() {
        for bit in 1..12 {
            let bad = 0x5000 | 1 | 1 << bit;
            assert_eq!(
                ScalableRootEntry::from_raw([bad, 0]),
                Err(FaultReason::Srt3),
                "lower bit {bit}"
            );
            assert_eq!(
                ScalableRootEntry::from_raw([0, bad]),
                Err(FaultReason::Srt3),
                "upper bit {bit}"
            );
            // Not present: the other bits are ignored.
            let ignored = ScalableRootEntry::from_raw([bad & !1, bad & !1]).unwrap();
            assert_eq!(ignored, ScalableRootEntry::default());
        }
    }

    #[test]
    fn devfn_selects_the_lower_or_upper_context_table() {
        let entry = ScalableRootEntry {
            lctp: Some(0x1000),
            uctp: Some(0x2000),
        };
        assert_eq!(entry.context_table(0x00, &CAPS), Ok(0x1000));
        assert_eq!(entry.context_table(0x7f, &CAPS), Ok(0x1000));
        assert_eq!(entry.context_table(0x80, &CAPS), Ok(0x2000));
        assert_eq!(entry.context_table(0xff, &CAPS), Ok(0x2000));

        let upper_missing = ScalableRootEntry {
            lctp: Some(0x1000),
            uctp: None,
        };
        assert_eq!(
            upper_missing.context_table(0x80, &CAPS),
            Err(FaultReason::Srt2)
        );
        assert_eq!(
            ScalableRootEntry::default().context_table(0, &CAPS),
            Err(FaultReason::Srt2)
        );
    }

    #[test]
    fn pointer_beyond_host_address_width_faults_srt3() {
        let entry = ScalableRootEntry {
            lctp: Some(1 << 46),
            uctp: Some((1 << 46) - 0x1000),
        };
        assert_eq!(entry.context_table(0, &CAPS), Err(FaultReason::Srt3));
        assert_eq!(entry.context_table(0x80, &CAPS), Ok((1 << 46) - 0x1000));
    }

    #[test]
    fn walk_reads_the_root_table() {
        let mem = TestMemory::new(1 << 20);
        let rta = 0x8000;
        let sid_lo = SourceId::new(3, 0x02, 1).unwrap();
        let sid_hi = SourceId::new(3, 0x1f, 7).unwrap();
        put(&mem, root_entry_addr(rta, 3), &[0x9000 | 1, 0xa000 | 1]);
        assert_eq!(read_root_entry(&mem, rta, 3), Ok([0x9001, 0xa001]));
        assert_eq!(context_table_addr(&mem, rta, sid_lo, &CAPS), Ok(0x9000));
        assert_eq!(context_table_addr(&mem, rta, sid_hi, &CAPS), Ok(0xa000));

        // Bus 4 has no entry: not present.
        let other = SourceId::new(4, 0, 0).unwrap();
        assert_eq!(
            context_table_addr(&mem, rta, other, &CAPS),
            Err(FaultReason::Srt2)
        );

        // A bad upper half only faults the upper device functions.
        put(&mem, root_entry_addr(rta, 3) + 8, &[0xa000 | 1 | 0x10]);
        assert_eq!(context_table_addr(&mem, rta, sid_lo, &CAPS), Ok(0x9000));
        assert_eq!(
            context_table_addr(&mem, rta, sid_hi, &CAPS),
            Err(FaultReason::Srt3)
        );
    }

    #[test]
    fn unreadable_root_table_faults_srt1() {
        let mem = TestMemory::new(0x1000);
        assert_eq!(read_root_entry(&mem, 0x1000, 0), Err(FaultReason::Srt1));
        let sid = SourceId::new(0, 0, 0).unwrap();
        assert_eq!(
            context_table_addr(&mem, 0x1000, sid, &CAPS),
            Err(FaultReason::Srt1)
        );
    }

    #[test]
    fn entry_fault_display_names_the_fpd() {
        let disabled = EntryFault::new(FaultReason::Sct2, true);
        assert_eq!(
            disabled.to_string(),
            "SCT.2 (0x41): context entry not present (FPD set)"
        );
        assert_eq!(
            EntryFault::from(FaultReason::Srt1).to_string(),
            "SRT.1 (0x38): error accessing the root entry"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn round_trips(lctp in proptest::option::of(any::<u64>()),
                       uctp in proptest::option::of(any::<u64>())) {
            let entry = ScalableRootEntry {
                lctp: lctp.map(|p| p & PTR_MASK),
                uctp: uctp.map(|p| p & PTR_MASK),
            };
            prop_assert_eq!(ScalableRootEntry::from_raw(entry.to_raw()), Ok(entry));
        }
    }
}
