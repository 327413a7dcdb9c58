//! The scalable-mode context entry (VT-d §9.4) and its place in the context tables (§3.4.3).
//!
//! A scalable-mode context table is one 4 KiB page of 128 context entries of 256 bits. The
//! root entry of a bus points to two of them: the lower table holds device functions 0-127
//! and the upper table 128-255, each at index `devfn % 128`.

use crate::addr::{Pasid, SourceId};
use crate::fault::FaultReason;
use crate::field::flag;
use crate::root::{context_table_addr, Capabilities, EntryChecks, EntryFault, PTR_MASK};
use vsva_mem::PhysMem;

/// Size of a scalable-mode context entry in bytes.
pub const CONTEXT_ENTRY_SIZE: u64 = 32;

const P: u64 = 1 << 0;
const FPD: u64 = 1 << 1;
const DTE: u64 = 1 << 2;
const PASIDE: u64 = 1 << 3;
const PRE: u64 = 1 << 4;
const PDTS_SHIFT: u32 = 9;
const PDTS_MASK: u64 = 0x7;
/// Reserved bits of qword 0: 8:5.
const RSVD0: u64 = 0x1e0;
const RID_PASID_MASK: u64 = 0xf_ffff;
const RID_PRIV: u64 = 1 << 20;
/// Reserved bits of qword 1: 127:85.
const RSVD1: u64 = !(RID_PASID_MASK | RID_PRIV);

/// Address of `devfn`'s entry in the context table at `ctp` (the lower table for device
/// functions 0-127 or the upper one for 128-255, as the root entry selects).
pub const fn context_entry_addr(ctp: u64, devfn: u8) -> u64 {
    (ctp & PTR_MASK) + (devfn & 0x7f) as u64 * CONTEXT_ENTRY_SIZE
}

/// A present scalable-mode context entry (§9.4). P is not a field: decoding an entry whose
/// P is clear gives SCT.2, and encoding sets it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ScalableContextEntry {
    /// FPD: fault processing disable for faults found through this entry.
    pub fpd: bool,
    /// DTE: device-TLB enable (translation requests allowed).
    pub dte: bool,
    /// PASIDE: PASID enable (requests with PASID allowed).
    pub paside: bool,
    /// PRE: page request enable.
    pub pre: bool,
    /// PDTS: PASID directory size, 0-7; the directory has `2^(PDTS + 7)` entries.
    pub pdts: u8,
    /// PASIDDIRPTR: the 4 KiB aligned PASID directory.
    pub pasiddirptr: u64,
    /// RID_PASID: the PASID that requests without PASID are translated with.
    pub rid_pasid: Pasid,
    /// RID_PRIV: requests without PASID are supervisor requests.
    pub rid_priv: bool,
}

impl ScalableContextEntry {
    /// The four qwords of the entry.
    pub const fn to_raw(&self) -> [u64; 4] {
        let q0 = P
            | flag(self.fpd, FPD)
            | flag(self.dte, DTE)
            | flag(self.paside, PASIDE)
            | flag(self.pre, PRE)
            | (self.pdts as u64 & PDTS_MASK) << PDTS_SHIFT
            | (self.pasiddirptr & PTR_MASK);
        let q1 = self.rid_pasid.raw() as u64 | flag(self.rid_priv, RID_PRIV);
        [q0, q1, 0, 0]
    }

    /// Decodes an entry: P clear gives SCT.2, a reserved bit set (8:5, 127:85, 255:128)
    /// SCT.3. Checks that depend on the unit's capabilities are in [`Self::validate`].
    pub const fn from_raw(raw: [u64; 4]) -> Result<Self, FaultReason> {
        if raw[0] & P == 0 {
            return Err(FaultReason::Sct2);
        }
        if raw[0] & RSVD0 != 0 || raw[1] & RSVD1 != 0 || raw[2] != 0 || raw[3] != 0 {
            return Err(FaultReason::Sct3);
        }
        Ok(Self::fields(raw))
    }

    /// [`Self::from_raw`] then [`Self::validate`] with the unit's `checks`: one masked
    /// compare of the words (present, reserved bits, address width) accepts a valid entry;
    /// the field checks name the fault of one that fails it.
    #[inline]
    pub const fn from_raw_checked(
        raw: [u64; 4],
        checks: &EntryChecks,
    ) -> Result<Self, FaultReason> {
        let [q0, q1, q2, q3] = raw;
        let bad = (q0 & (checks.context_rsvd0 | checks.beyond_haw)) | (q1 & RSVD1) | q2 | q3;
        if q0 & P != 0 && bad == 0 {
            return Ok(Self::fields(raw));
        }
        Self::by_fields(raw, checks)
    }

    /// The field checks of an entry the masked compare did not accept (its fault), out of
    /// the line of a valid entry's.
    #[cold]
    #[inline(never)]
    const fn by_fields(raw: [u64; 4], checks: &EntryChecks) -> Result<Self, FaultReason> {
        match Self::from_raw(raw) {
            Ok(entry) => match entry.validate(&checks.caps) {
                Ok(()) => Ok(entry),
                Err(reason) => Err(reason),
            },
            Err(reason) => Err(reason),
        }
    }

    /// The fields of an entry whose checks passed.
    const fn fields(raw: [u64; 4]) -> Self {
        ScalableContextEntry {
            fpd: raw[0] & FPD != 0,
            dte: raw[0] & DTE != 0,
            paside: raw[0] & PASIDE != 0,
            pre: raw[0] & PRE != 0,
            pdts: ((raw[0] >> PDTS_SHIFT) & PDTS_MASK) as u8,
            pasiddirptr: raw[0] & PTR_MASK,
            rid_pasid: Pasid::from_low_bits(raw[1]),
            rid_priv: raw[1] & RID_PRIV != 0,
        }
    }

    /// The checks that depend on what the unit supports: DTE, PASIDE and PRE are reserved
    /// without ECAP.DT, ECAP.PASID and ECAP.PRS (SCT.3); a PASID directory beyond the host
    /// address width is invalid programming (SCT.4).
    pub const fn validate(&self, caps: &Capabilities) -> Result<(), FaultReason> {
        if (self.dte && !caps.dt) || (self.paside && !caps.pasid) || (self.pre && !caps.prs) {
            Err(FaultReason::Sct3)
        } else if caps.beyond_haw(self.pasiddirptr) {
            Err(FaultReason::Sct4)
        } else {
            Ok(())
        }
    }

    /// Number of entries of the PASID directory: `2^(PDTS + 7)`, each covering 64 PASIDs.
    pub const fn pasid_dir_entries(&self) -> u32 {
        1 << ((self.pdts as u64 & PDTS_MASK) + 7)
    }

    /// Whether the PASID directory has an entry for `pasid`.
    pub const fn covers(&self, pasid: Pasid) -> bool {
        (pasid.dir_index() as u64) < self.pasid_dir_entries() as u64
    }

    /// The PASID a request is translated with: its own, or RID_PASID for a request without
    /// PASID. A request with PASID needs PASIDE (SCT.6) and a PASID the directory covers
    /// (SCT.7); RID_PASID beyond the directory makes requests without PASID fail (SCT.9).
    pub const fn pasid_for_request(&self, pasid: Option<Pasid>) -> Result<Pasid, FaultReason> {
        match pasid {
            Some(_) if !self.paside => Err(FaultReason::Sct6),
            Some(p) if !self.covers(p) => Err(FaultReason::Sct7),
            Some(p) => Ok(p),
            None if !self.covers(self.rid_pasid) => Err(FaultReason::Sct9),
            None => Ok(self.rid_pasid),
        }
    }
}

/// Context-entry qword 0 bits that must be clear on a unit with `caps`: the reserved bits
/// 8:5, and DTE, PASIDE and PRE without ECAP.DT, PASID and PRS (as
/// [`ScalableContextEntry::validate`] checks them).
pub(crate) const fn reserved0(caps: &Capabilities) -> u64 {
    RSVD0 | flag(!caps.dt, DTE) | flag(!caps.pasid, PASIDE) | flag(!caps.prs, PRE)
}

/// The context entry of `sid`, found from the root table at `rta` as hardware does
/// (root entry, then lower or upper context table), decoded and validated with the unit's
/// `checks`.
///
/// Root-entry faults (SRT.x) and a failed read (SCT.1) cannot be disabled; the other faults
/// carry the entry's FPD, which hardware honours even when P is clear.
pub fn read_context_entry(
    mem: &impl PhysMem,
    rta: u64,
    sid: SourceId,
    checks: &EntryChecks,
) -> Result<ScalableContextEntry, EntryFault> {
    let ctp = context_table_addr(mem, rta, sid, &checks.caps)?;
    let mut raw = [0; 4];
    mem.read_u64s(context_entry_addr(ctp, sid.devfn()), &mut raw)
        .map_err(|_| FaultReason::Sct1)?;
    ScalableContextEntry::from_raw_checked(raw, checks)
        .map_err(|reason| EntryFault::new(reason, raw[0] & FPD != 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::root::tests::{any_caps, flipped, put, CAPS, CHECKS};
    use crate::root::{root_entry_addr, ScalableRootEntry};
    use crate::testutil::TestMemory;
    use proptest::prelude::*;

    fn pasid(raw: u32) -> Pasid {
        Pasid::new(raw).unwrap()
    }

    #[test]
    fn entry_address_by_devfn() {
        assert_eq!(context_entry_addr(0x4000, 0x00), 0x4000);
        assert_eq!(context_entry_addr(0x4000, 0x01), 0x4020);
        assert_eq!(context_entry_addr(0x4000, 0x7f), 0x4fe0);
        // Upper table: devfn 0x80 is entry 0 of the table UCTP points to.
        assert_eq!(context_entry_addr(0x5000, 0x80), 0x5000);
        assert_eq!(context_entry_addr(0x5000, 0xff), 0x5fe0);
    }

    #[test]
    fn encodes_the_spec_layout() {
        // The entry Linux writes for a PASID-capable device: P, DTE, PASIDE, PRE, a
        // 2^(5+7)-entry directory at 0x1_2345_6000, RID_PASID 0.
        let entry = ScalableContextEntry {
            fpd: false,
            dte: true,
            paside: true,
            pre: true,
            pdts: 5,
            pasiddirptr: 0x1_2345_6000,
            rid_pasid: pasid(0),
            rid_priv: false,
        };
        let raw = [0x0000_0001_2345_6a1d, 0, 0, 0];
        assert_eq!(entry.to_raw(), raw);
        assert_eq!(ScalableContextEntry::from_raw(raw), Ok(entry));

        let entry = ScalableContextEntry {
            fpd: true,
            dte: false,
            paside: false,
            pre: false,
            pdts: 7,
            pasiddirptr: 0xff_f000,
            rid_pasid: pasid(0xf_ffff),
            rid_priv: true,
        };
        let raw = [0x0000_0000_00ff_fe03, 0x0000_0000_001f_ffff, 0, 0];
        assert_eq!(entry.to_raw(), raw);
        assert_eq!(ScalableContextEntry::from_raw(raw), Ok(entry));
    }

    #[test]
    fn not_present_faults_sct2() {
        assert_eq!(
            ScalableContextEntry::from_raw([0, 0, 0, 0]),
            Err(FaultReason::Sct2)
        );
        assert_eq!(
            ScalableContextEntry::from_raw([0x5002, 0, 0, 0]),
            Err(FaultReason::Sct2)
        );
    }

    #[test]
    fn every_reserved_bit_faults_sct3() {
        let good = [0x5001, 0, 0, 0];
        let reserved: Vec<(usize, u32)> = (5..9)
            .map(|b| (0, b))
            .chain((21..64).map(|b| (1, b)))
            .chain((0..64).map(|b| (2, b)))
            .chain((0..64).map(|b| (3, b)))
            .collect();
        assert_eq!(reserved.len(), 4 + 43 + 128);
        for (q, b) in reserved {
            let mut raw = good;
            raw[q] |= 1 << b;
            assert_eq!(
                ScalableContextEntry::from_raw(raw),
                Err(FaultReason::Sct3),
                "bit {}",
                q * 64 + b as usize
            );
        }
    }

    #[test]
    fn unsupported_features_and_wide_pointers() {
        let entry = ScalableContextEntry {
            dte: true,
            paside: true,
            pre: true,
            pasiddirptr: 0x5000,
            ..Default::default()
        };
        assert_eq!(entry.validate(&CAPS), Ok(()));
        for caps in [
            Capabilities { dt: false, ..CAPS },
            Capabilities {
                pasid: false,
                ..CAPS
            },
            Capabilities { prs: false, ..CAPS },
        ] {
            assert_eq!(entry.validate(&caps), Err(FaultReason::Sct3), "{caps:?}");
        }
        let wide = ScalableContextEntry {
            pasiddirptr: 1 << 46,
            ..entry
        };
        assert_eq!(wide.validate(&CAPS), Err(FaultReason::Sct4));
        let widest = Capabilities { haw: 64, ..CAPS };
        assert_eq!(wide.validate(&widest), Ok(()));
    }

    #[test]
    fn pdts_sizes_the_pasid_directory() {
        let mut entry = ScalableContextEntry {
            paside: true,
            ..Default::default()
        };
        assert_eq!(entry.pasid_dir_entries(), 128);
        // 128 directory entries cover PASIDs 0..8192.
        assert_eq!(
            entry.pasid_for_request(Some(pasid(0x1fff))),
            Ok(pasid(0x1fff))
        );
        assert_eq!(
            entry.pasid_for_request(Some(pasid(0x2000))),
            Err(FaultReason::Sct7)
        );
        entry.pdts = 7;
        assert_eq!(entry.pasid_dir_entries(), 1 << 14);
        assert_eq!(entry.pasid_for_request(Some(Pasid::MAX)), Ok(Pasid::MAX));
    }

    #[test]
    fn request_pasid_selection() {
        let entry = ScalableContextEntry {
            rid_pasid: pasid(0x40),
            ..Default::default()
        };
        assert_eq!(entry.pasid_for_request(None), Ok(pasid(0x40)));
        assert_eq!(
            entry.pasid_for_request(Some(pasid(1))),
            Err(FaultReason::Sct6)
        );
        let far = ScalableContextEntry {
            rid_pasid: pasid(0x2000),
            ..entry
        };
        assert_eq!(far.pasid_for_request(None), Err(FaultReason::Sct9));
    }

    /// A root table at 0x1000 whose bus 0 has context tables at 0x2000 and 0x3000.
    fn tables() -> TestMemory {
        let mem = TestMemory::new(0x10_0000);
        let root = ScalableRootEntry {
            lctp: Some(0x2000),
            uctp: Some(0x3000),
        };
        put(&mem, root_entry_addr(0x1000, 0), &root.to_raw());
        mem
    }

    #[test]
    fn walk_finds_lower_and_upper_entries() {
        let mem = tables();
        let lower = ScalableContextEntry {
            paside: true,
            pasiddirptr: 0x8000,
            ..Default::default()
        };
        let upper = ScalableContextEntry {
            pdts: 3,
            pasiddirptr: 0x9000,
            ..Default::default()
        };
        put(&mem, context_entry_addr(0x2000, 0x10), &lower.to_raw());
        put(&mem, context_entry_addr(0x3000, 0x90), &upper.to_raw());
        let sid = |devfn: u8| SourceId::from_rid(u16::from(devfn));
        assert_eq!(
            read_context_entry(&mem, 0x1000, sid(0x10), &CHECKS),
            Ok(lower)
        );
        assert_eq!(
            read_context_entry(&mem, 0x1000, sid(0x90), &CHECKS),
            Ok(upper)
        );
        // 0x90 is at index 0x10 of the upper table, not of the lower one.
        assert_eq!(upper.to_raw()[0], mem.read_u64(0x3200).unwrap());
    }

    #[test]
    fn walk_faults_carry_the_context_fpd() {
        let mem = tables();
        let sid = SourceId::from_rid(0x05);
        let at = context_entry_addr(0x2000, 0x05);
        let read = |mem: &TestMemory| read_context_entry(mem, 0x1000, sid, &CHECKS);

        assert_eq!(read(&mem), Err(EntryFault::new(FaultReason::Sct2, false)));
        // Not present, FPD set: the fault is not to be recorded.
        put(&mem, at, &[FPD]);
        assert_eq!(read(&mem), Err(EntryFault::new(FaultReason::Sct2, true)));
        put(&mem, at, &[P | FPD | 1 << 5]);
        assert_eq!(read(&mem), Err(EntryFault::new(FaultReason::Sct3, true)));
        put(&mem, at, &[P | 1 << 50]);
        assert_eq!(read(&mem), Err(EntryFault::new(FaultReason::Sct4, false)));
        // Bus 1 has no root entry half: SRT.2, never disabled.
        let other = SourceId::from_rid(0x0105);
        assert_eq!(
            read_context_entry(&mem, 0x1000, other, &CHECKS),
            Err(EntryFault::new(FaultReason::Srt2, false))
        );
    }

    #[test]
    fn unreadable_context_table_faults_sct1() {
        let mem = TestMemory::new(0x2000);
        let root = ScalableRootEntry {
            lctp: Some(0x2000),
            uctp: None,
        };
        put(&mem, root_entry_addr(0x1000, 0), &root.to_raw());
        assert_eq!(
            read_context_entry(&mem, 0x1000, SourceId::from_rid(0), &CHECKS),
            Err(EntryFault::new(FaultReason::Sct1, false))
        );
    }

    /// Any 256 bits, mostly near a valid entry: an encoded entry with up to three bits
    /// flipped, or four random qwords; half the entries with a PASID directory below 2^39.
    fn any_raw_entry() -> impl Strategy<Value = [u64; 4]> {
        let entry = (any::<[bool; 6]>(), 0u8..8, any::<u64>(), 0u32..(1 << 20)).prop_map(
            |(b, pdts, ptr, rid_pasid)| {
                ScalableContextEntry {
                    fpd: b[0],
                    dte: b[1],
                    paside: b[2],
                    pre: b[3],
                    pdts,
                    pasiddirptr: ptr & PTR_MASK & if b[5] { (1 << 39) - 1 } else { !0 },
                    rid_pasid: pasid(rid_pasid),
                    rid_priv: b[4],
                }
                .to_raw()
            },
        );
        prop_oneof![4 => flipped(entry, 2), 1 => any::<[u64; 4]>()]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn word_checks_agree_with_the_field_checks(raw in any_raw_entry(), caps in any_caps()) {
            let by_fields = ScalableContextEntry::from_raw(raw)
                .and_then(|e| e.validate(&caps).map(|()| e));
            let checks = EntryChecks::new(&caps);
            prop_assert_eq!(ScalableContextEntry::from_raw_checked(raw, &checks), by_fields);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn round_trips(fpd: bool, dte: bool, paside: bool, pre: bool, pdts in 0u8..8,
                       ptr: u64, rid_pasid in 0u32..(1 << 20), rid_priv: bool) {
            let entry = ScalableContextEntry {
                fpd, dte, paside, pre, pdts,
                pasiddirptr: ptr & PTR_MASK,
                rid_pasid: pasid(rid_pasid),
                rid_priv,
            };
            prop_assert_eq!(ScalableContextEntry::from_raw(entry.to_raw()), Ok(entry));
        }
    }
}
