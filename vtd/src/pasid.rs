//! The scalable-mode PASID directory entry (VT-d §9.5) and PASID table entry (§9.6), and
//! the walk from a context entry to the PASID entry of a request (§3.4.3).
//!
//! The PASID directory at PASIDDIRPTR has `2^(PDTS + 7)` 64-bit entries, indexed by PASID
//! bits 19:6. Each present one points to a 4 KiB PASID table of 64 entries of 512 bits,
//! indexed by PASID bits 5:0. The PASID table entry selects the translation (PGTT) and holds
//! the first- and second-level table pointers, the domain id and the request controls.

use crate::addr::{DomainId, Pasid, SourceId};
use crate::context::{read_context_entry, ScalableContextEntry};
use crate::fault::FaultReason;
use crate::field::flag;
use crate::flpte::{FlFormat, FlPagingMode};
use crate::root::{Capabilities, EntryChecks, EntryFault, PTR_MASK};
use crate::slpte::{SlFormat, SlLevels};
use crate::walk::{FlConfig, SlConfig};
use vsva_mem::PhysMem;

/// Size of a PASID directory entry in bytes.
pub const PASID_DIR_ENTRY_SIZE: u64 = 8;
/// Size of a scalable-mode PASID table entry in bytes.
pub const PASID_ENTRY_SIZE: u64 = 64;

const P: u64 = 1 << 0;
const FPD: u64 = 1 << 1;

/// Reserved bits of a PASID directory entry: 11:2.
const PDE_RSVD: u64 = 0xffc;

// Qword 0 of a PASID table entry.
const AW_SHIFT: u32 = 2;
const SLEE: u64 = 1 << 5;
const PGTT_SHIFT: u32 = 6;
const SLADE: u64 = 1 << 9;
const RSVD0: u64 = 0xc00;
// Qword 1.
const DID_MASK: u64 = 0xffff;
const RSVD1: u64 = 0x7f_0000;
const PWSNP: u64 = 1 << 23;
const PGSNP: u64 = 1 << 24;
const CD: u64 = 1 << 25;
const EMTE: u64 = 1 << 26;
const EMT_SHIFT: u32 = 27;
const PWT: u64 = 1 << 30;
const PCD: u64 = 1 << 31;
const PAT_SHIFT: u32 = 32;
// Qword 2.
const SRE: u64 = 1 << 0;
const ERE: u64 = 1 << 1;
const FLPM_SHIFT: u32 = 2;
const WPE: u64 = 1 << 4;
const NXE: u64 = 1 << 5;
const SMEP: u64 = 1 << 6;
const EAFE: u64 = 1 << 7;
const RSVD2: u64 = 0xf00;

/// The memory-type fields of qword 1: CD, EMTE, EMT (93:91), PWT, PCD, PAT (127:96).
const MEMORY_TYPE: u64 = CD | EMTE | 0x7 << EMT_SHIFT | PWT | PCD | 0xffff_ffff << PAT_SHIFT;
/// The PGTT values (bit n for PGTT n) that walk second-level tables: 010b and 011b.
const SL_PGTTS: u64 = 1 << Pgtt::SecondLevel as u64 | 1 << Pgtt::Nested as u64;
/// The PGTT values that walk first-level tables: 001b and 011b.
const FL_PGTTS: u64 = 1 << Pgtt::FirstLevel as u64 | 1 << Pgtt::Nested as u64;
/// The AW values that are not reserved (bit n for AW n): 3-, 4- and 5-level tables.
const AW_ENCODINGS: u8 = 0b1110;
/// The FLPM values that are not reserved: 4- and 5-level paging.
const FLPM_ENCODINGS: u8 = 0b11;

/// A present PASID directory entry (§9.5). P is not a field: decoding an entry whose P is
/// clear gives SPD.2, and encoding sets it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PasidDirEntry {
    /// FPD: fault processing disable for faults found through this entry.
    pub fpd: bool,
    /// SMPTBLPTR: the 4 KiB aligned scalable-mode PASID table.
    pub smptblptr: u64,
}

impl PasidDirEntry {
    /// The 64-bit entry.
    pub const fn to_raw(&self) -> u64 {
        P | flag(self.fpd, FPD) | (self.smptblptr & PTR_MASK)
    }

    /// Decodes an entry: P clear gives SPD.2, a reserved bit (11:2) set SPD.3.
    pub const fn from_raw(raw: u64) -> Result<Self, FaultReason> {
        if raw & P == 0 {
            Err(FaultReason::Spd2)
        } else if raw & PDE_RSVD != 0 {
            Err(FaultReason::Spd3)
        } else {
            Ok(PasidDirEntry {
                fpd: raw & FPD != 0,
                smptblptr: raw & PTR_MASK,
            })
        }
    }

    /// A PASID table beyond the host address width is a reserved-bit fault (SPD.3).
    pub const fn validate(&self, caps: &Capabilities) -> Result<(), FaultReason> {
        if caps.beyond_haw(self.smptblptr) {
            Err(FaultReason::Spd3)
        } else {
            Ok(())
        }
    }
}

/// PGTT: the PASID-granular translation type (§9.6). The encodings 000b and 101b-111b are
/// reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pgtt {
    /// 001b: first-level translation only.
    FirstLevel = 1,
    /// 010b: second-level translation only.
    SecondLevel = 2,
    /// 011b: nested: first level, with every first-level address translated by the second.
    Nested = 3,
    /// 100b: pass-through: the input address is the output address.
    PassThrough = 4,
}

impl Pgtt {
    /// The PGTT value, or `None` for a reserved encoding.
    pub const fn from_bits(bits: u8) -> Option<Self> {
        match bits {
            1 => Some(Pgtt::FirstLevel),
            2 => Some(Pgtt::SecondLevel),
            3 => Some(Pgtt::Nested),
            4 => Some(Pgtt::PassThrough),
            _ => None,
        }
    }

    /// Whether translation walks first-level tables (FLPTPTR, FLPM).
    pub const fn uses_first_level(self) -> bool {
        matches!(self, Pgtt::FirstLevel | Pgtt::Nested)
    }

    /// Whether translation walks second-level tables (SLPTPTR, AW).
    pub const fn uses_second_level(self) -> bool {
        matches!(self, Pgtt::SecondLevel | Pgtt::Nested)
    }
}

/// A present scalable-mode PASID table entry (§9.6, 512 bits). P is not a field: decoding
/// an entry whose P is clear gives SPT.2, and encoding sets it. Every other field is kept
/// whatever PGTT says, so an entry decodes and encodes back to the same bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PasidEntry {
    /// FPD (bit 1): fault processing disable.
    pub fpd: bool,
    /// AW (4:2): second-level address width, as the number of table levels.
    pub aw: SlLevels,
    /// SLEE (5): second-level execute enable.
    pub slee: bool,
    /// PGTT (8:6): translation type.
    pub pgtt: Pgtt,
    /// SLADE (9): second-level accessed/dirty enable.
    pub slade: bool,
    /// SLPTPTR (63:12): second-level page-table pointer.
    pub slptptr: u64,
    /// DID (79:64): domain id.
    pub did: DomainId,
    /// PWSNP (87): page-walk snoop.
    pub pwsnp: bool,
    /// PGSNP (88): page snoop.
    pub pgsnp: bool,
    /// CD (89): cache disable.
    pub cd: bool,
    /// EMTE (90): extended memory type enable.
    pub emte: bool,
    /// EMT (93:91): extended memory type, 3 bits.
    pub emt: u8,
    /// PWT (94): page-level write-through of the first-level root.
    pub pwt: bool,
    /// PCD (95): page-level cache disable of the first-level root.
    pub pcd: bool,
    /// PAT (127:96): page attribute table.
    pub pat: u32,
    /// SRE (128): supervisor requests enable.
    pub sre: bool,
    /// ERE (129): execute requests enable.
    pub ere: bool,
    /// FLPM (131:130): first-level paging mode.
    pub flpm: FlPagingMode,
    /// WPE (132): write protect enable for supervisor requests.
    pub wpe: bool,
    /// NXE (133): no-execute enable.
    pub nxe: bool,
    /// SMEP (134): supervisor mode execute protection.
    pub smep: bool,
    /// EAFE (135): extended accessed flag enable.
    pub eafe: bool,
    /// FLPTPTR (191:140): first-level page-table pointer (a GPA when nested).
    pub flptptr: u64,
}

impl PasidEntry {
    /// An entry of translation type `pgtt` in domain `did` with every other field clear:
    /// no table pointers, no flags, no memory type, and both paging modes at their
    /// 4-level encodings. Callers set the fields their entry needs with struct update
    /// syntax (`PasidEntry { slptptr, ..PasidEntry::new(Pgtt::SecondLevel, did) }`).
    pub const fn new(pgtt: Pgtt, did: DomainId) -> PasidEntry {
        PasidEntry {
            fpd: false,
            aw: SlLevels::Four,
            slee: false,
            pgtt,
            slade: false,
            slptptr: 0,
            did,
            pwsnp: false,
            pgsnp: false,
            cd: false,
            emte: false,
            emt: 0,
            pwt: false,
            pcd: false,
            pat: 0,
            sre: false,
            ere: false,
            flpm: FlPagingMode::FourLevel,
            wpe: false,
            nxe: false,
            smep: false,
            eafe: false,
            flptptr: 0,
        }
    }

    /// The eight qwords of the entry; qwords 3-7 are reserved and zero.
    pub const fn to_raw(&self) -> [u64; 8] {
        let q0 = P
            | flag(self.fpd, FPD)
            | (self.aw.aw() as u64) << AW_SHIFT
            | flag(self.slee, SLEE)
            | (self.pgtt as u64) << PGTT_SHIFT
            | flag(self.slade, SLADE)
            | (self.slptptr & PTR_MASK);
        let q1 = self.did.0 as u64
            | flag(self.pwsnp, PWSNP)
            | flag(self.pgsnp, PGSNP)
            | flag(self.cd, CD)
            | flag(self.emte, EMTE)
            | (self.emt as u64 & 0x7) << EMT_SHIFT
            | flag(self.pwt, PWT)
            | flag(self.pcd, PCD)
            | (self.pat as u64) << PAT_SHIFT;
        let q2 = flag(self.sre, SRE)
            | flag(self.ere, ERE)
            | (self.flpm.flpm() as u64) << FLPM_SHIFT
            | flag(self.wpe, WPE)
            | flag(self.nxe, NXE)
            | flag(self.smep, SMEP)
            | flag(self.eafe, EAFE)
            | (self.flptptr & PTR_MASK);
        [q0, q1, q2, 0, 0, 0, 0, 0]
    }

    /// Decodes an entry: P clear gives SPT.2; a reserved bit set (11:10, 86:80, 139:136,
    /// 511:192) SPT.3; a reserved PGTT, AW or FLPM encoding SPT.4. Checks that depend on
    /// the unit's capabilities are in [`Self::validate`].
    pub const fn from_raw(raw: [u64; 8]) -> Result<Self, FaultReason> {
        let [q0, q1, q2, q3, q4, q5, q6, q7] = raw;
        if q0 & P == 0 {
            return Err(FaultReason::Spt2);
        }
        if q0 & RSVD0 != 0 || q1 & RSVD1 != 0 || q2 & RSVD2 != 0 || (q3 | q4 | q5 | q6 | q7) != 0 {
            return Err(FaultReason::Spt3);
        }
        match Self::fields(raw) {
            Some(entry) => Ok(entry),
            None => Err(FaultReason::Spt4),
        }
    }

    /// The fields of an entry, or `None` if its PGTT, AW or FLPM encoding is reserved.
    const fn fields(raw: [u64; 8]) -> Option<Self> {
        let [q0, q1, q2, ..] = raw;
        let (Some(aw), Some(pgtt), Some(flpm)) = (
            SlLevels::from_aw(((q0 >> AW_SHIFT) & 0x7) as u8),
            Pgtt::from_bits(((q0 >> PGTT_SHIFT) & 0x7) as u8),
            FlPagingMode::from_flpm(((q2 >> FLPM_SHIFT) & 0x3) as u8),
        ) else {
            return None;
        };
        Some(Self::with_encodings([q0, q1, q2], aw, pgtt, flpm))
    }

    /// The fields of qwords 0-2, with AW, PGTT and FLPM already decoded.
    const fn with_encodings(
        [q0, q1, q2]: [u64; 3],
        aw: SlLevels,
        pgtt: Pgtt,
        flpm: FlPagingMode,
    ) -> Self {
        PasidEntry {
            fpd: q0 & FPD != 0,
            aw,
            slee: q0 & SLEE != 0,
            pgtt,
            slade: q0 & SLADE != 0,
            slptptr: q0 & PTR_MASK,
            did: DomainId((q1 & DID_MASK) as u16),
            pwsnp: q1 & PWSNP != 0,
            pgsnp: q1 & PGSNP != 0,
            cd: q1 & CD != 0,
            emte: q1 & EMTE != 0,
            emt: ((q1 >> EMT_SHIFT) & 0x7) as u8,
            pwt: q1 & PWT != 0,
            pcd: q1 & PCD != 0,
            pat: (q1 >> PAT_SHIFT) as u32,
            sre: q2 & SRE != 0,
            ere: q2 & ERE != 0,
            flpm,
            wpe: q2 & WPE != 0,
            nxe: q2 & NXE != 0,
            smep: q2 & SMEP != 0,
            eafe: q2 & EAFE != 0,
            flptptr: q2 & PTR_MASK,
        }
    }

    /// The checks that depend on what the unit supports.
    ///
    /// SPT.3, fields that are reserved without their capability: SLADE (ECAP.SLADS), SRE
    /// (SRS), ERE (ERS), EAFE (EAFS), PGSNP (SC), PWSNP (SMPWC), and the memory-type fields
    /// CD, EMTE, EMT, PWT, PCD, PAT (MTS).
    ///
    /// SPT.4, invalid programming for the PGTT: a translation type the unit lacks (FLTS,
    /// SLTS, NEST, PT); with a second level, an AW that CAP.SAGAW does not list or an
    /// SLPTPTR beyond the host address width; with a first level, 5-level paging without
    /// CAP.FL5LP; first level only, an FLPTPTR beyond the host address width (a nested
    /// FLPTPTR is a guest address, checked by the second-level walk instead).
    pub const fn validate(&self, caps: &Capabilities) -> Result<(), FaultReason> {
        let memory_type =
            self.cd || self.emte || self.emt != 0 || self.pwt || self.pcd || self.pat != 0;
        if (self.slade && !caps.slads)
            || (self.sre && !caps.srs)
            || (self.ere && !caps.ers)
            || (self.eafe && !caps.eafs)
            || (self.pgsnp && !caps.sc)
            || (self.pwsnp && !caps.smpwc)
            || (memory_type && !caps.mts)
        {
            return Err(FaultReason::Spt3);
        }
        let supported = match self.pgtt {
            Pgtt::FirstLevel => caps.flts,
            Pgtt::SecondLevel => caps.slts,
            Pgtt::Nested => caps.nest,
            Pgtt::PassThrough => caps.pt,
        };
        let bad_second_level = self.pgtt.uses_second_level()
            && ((caps.sagaw & (1 << self.aw.aw())) == 0 || caps.beyond_haw(self.slptptr));
        let bad_first_level = self.pgtt.uses_first_level()
            && ((matches!(self.flpm, FlPagingMode::FiveLevel) && !caps.fl5lp)
                || (matches!(self.pgtt, Pgtt::FirstLevel) && caps.beyond_haw(self.flptptr)));
        if !supported || bad_second_level || bad_first_level {
            Err(FaultReason::Spt4)
        } else {
            Ok(())
        }
    }

    /// The request controls of the entry: a supervisor (privileged) request needs SRE
    /// (SPT.6), an execute request ERE (SPT.5).
    pub const fn check_request(&self, supervisor: bool, execute: bool) -> Result<(), FaultReason> {
        if execute && !self.ere {
            Err(FaultReason::Spt5)
        } else if supervisor && !self.sre {
            Err(FaultReason::Spt6)
        } else {
            Ok(())
        }
    }
}

/// A PASID table entry that passed the unit's checks (§9.6), kept as its qwords 0-2 (3-7
/// are reserved and zero): what the request pipeline, the PASID cache and the walks use.
/// Each field is read from the words when asked for, so a miss decodes only the fields its
/// walk needs and a cache keeps and copies three words; [`Self::decode`] gives every field
/// as a [`PasidEntry`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct ValidPasidEntry([u64; 3]);

impl ValidPasidEntry {
    /// Checks the entry `raw` with the unit's `checks`, as [`PasidEntry::from_raw`] then
    /// [`PasidEntry::validate`] do: masked compares of the words (present, reserved bits,
    /// address widths) and bit tests of PGTT, AW and FLPM against what the unit supports
    /// accept a valid entry; the field checks name the fault of one that fails them.
    #[inline]
    pub const fn from_raw_checked(
        raw: [u64; 8],
        checks: &EntryChecks,
    ) -> Result<Self, FaultReason> {
        let [q0, q1, q2, q3, q4, q5, q6, q7] = raw;
        let pgtt = ((q0 >> PGTT_SHIFT) & 0x7) as usize;
        let [r0, r1, r2] = checks.pasid_rsvd;
        let [p0, p2] = checks.pasid_pointers[pgtt];
        let bad = (q0 & (r0 | p0)) | (q1 & r1) | (q2 & (r2 | p2)) | q3 | q4 | q5 | q6 | q7;
        let mode = 4 * ((q0 >> AW_SHIFT) & 0x7) + ((q2 >> FLPM_SHIFT) & 0x3);
        if q0 & P != 0 && bad == 0 && (checks.pasid_modes[pgtt] >> mode) & 1 != 0 {
            return Ok(ValidPasidEntry([q0, q1, q2]));
        }
        Self::by_fields(raw, checks)
    }

    /// The field checks of an entry the masked compares did not accept (its fault), out of
    /// the line of a valid entry's.
    #[cold]
    #[inline(never)]
    const fn by_fields(raw: [u64; 8], checks: &EntryChecks) -> Result<Self, FaultReason> {
        let [q0, q1, q2, ..] = raw;
        match PasidEntry::from_raw(raw) {
            Ok(entry) => match entry.validate(&checks.caps) {
                Ok(()) => Ok(ValidPasidEntry([q0, q1, q2])),
                Err(reason) => Err(reason),
            },
            Err(reason) => Err(reason),
        }
    }

    /// Qwords 0-2 of the entry.
    pub const fn words(&self) -> [u64; 3] {
        self.0
    }

    /// Every field of the entry.
    pub const fn decode(&self) -> PasidEntry {
        PasidEntry::with_encodings(self.0, self.aw(), self.pgtt(), self.flpm())
    }

    /// FPD (bit 1): fault processing disable.
    pub const fn fpd(&self) -> bool {
        self.0[0] & FPD != 0
    }

    /// PGTT (8:6): translation type (a checked entry's is not reserved).
    pub const fn pgtt(&self) -> Pgtt {
        match (self.0[0] >> PGTT_SHIFT) & 0x7 {
            1 => Pgtt::FirstLevel,
            2 => Pgtt::SecondLevel,
            3 => Pgtt::Nested,
            _ => Pgtt::PassThrough,
        }
    }

    /// AW (4:2): second-level address width, as the number of table levels.
    pub const fn aw(&self) -> SlLevels {
        match (self.0[0] >> AW_SHIFT) & 0x7 {
            1 => SlLevels::Three,
            2 => SlLevels::Four,
            _ => SlLevels::Five,
        }
    }

    /// DID (79:64): domain id.
    pub const fn did(&self) -> DomainId {
        DomainId((self.0[1] & DID_MASK) as u16)
    }

    /// SRE (128): supervisor requests enable.
    pub const fn sre(&self) -> bool {
        self.0[2] & SRE != 0
    }

    /// ERE (129): execute requests enable.
    pub const fn ere(&self) -> bool {
        self.0[2] & ERE != 0
    }

    /// FLPM (131:130): first-level paging mode.
    pub const fn flpm(&self) -> FlPagingMode {
        match (self.0[2] >> FLPM_SHIFT) & 0x3 {
            0 => FlPagingMode::FourLevel,
            _ => FlPagingMode::FiveLevel,
        }
    }

    /// What the first-level walker reads from the entry (FLPTPTR, FLPM, SRE, WPE, EAFE),
    /// with the unit's entry `format`.
    pub const fn fl_config(&self, format: FlFormat) -> FlConfig {
        let q2 = self.0[2];
        FlConfig {
            root: q2 & PTR_MASK,
            mode: self.flpm(),
            sre: q2 & SRE != 0,
            wpe: q2 & WPE != 0,
            eafe: q2 & EAFE != 0,
            format,
        }
    }

    /// What the second-level walker reads from the entry (SLPTPTR, AW, SLEE, SLADE), with
    /// the unit's entry `format`.
    pub const fn sl_config(&self, format: SlFormat) -> SlConfig {
        let q0 = self.0[0];
        SlConfig {
            root: q0 & PTR_MASK,
            levels: self.aw(),
            slee: q0 & SLEE != 0,
            slade: q0 & SLADE != 0,
            format,
        }
    }
}

/// PASID-entry qwords 0-2 bits that must be clear on a unit with `caps`: the reserved
/// fields, and SLADE; PGSNP, PWSNP and the memory-type fields; SRE, ERE and EAFE without
/// their capabilities (as [`PasidEntry::validate`] lists them).
pub(crate) const fn reserved(caps: &Capabilities) -> [u64; 3] {
    [
        RSVD0 | flag(!caps.slads, SLADE),
        RSVD1 | flag(!caps.sc, PGSNP) | flag(!caps.smpwc, PWSNP) | flag(!caps.mts, MEMORY_TYPE),
        RSVD2 | flag(!caps.srs, SRE) | flag(!caps.ers, ERE) | flag(!caps.eafs, EAFE),
    ]
}

/// By PGTT value, the AW and FLPM values a PASID entry may have on a unit with `caps`
/// (bit `4 * AW + FLPM`, as [`PasidEntry::validate`] and [`PasidEntry::from_raw`] check
/// them): none for a reserved PGTT or one the unit lacks (ECAP.FLTS, SLTS, NEST, PT); AW
/// 3-, 4- or 5-level, and with a second level only those CAP.SAGAW lists; FLPM 4- or
/// 5-level, and with a first level 5-level only with CAP.FL5LP.
pub(crate) const fn modes(caps: &Capabilities) -> [u32; 8] {
    let supported = flag(caps.flts, 1 << Pgtt::FirstLevel as u64)
        | flag(caps.slts, 1 << Pgtt::SecondLevel as u64)
        | flag(caps.nest, 1 << Pgtt::Nested as u64)
        | flag(caps.pt, 1 << Pgtt::PassThrough as u64);
    let mut modes = [0; 8];
    let mut pgtt = 0;
    while pgtt < 8 {
        let aws = if (SL_PGTTS >> pgtt) & 1 != 0 {
            caps.sagaw & AW_ENCODINGS
        } else {
            AW_ENCODINGS
        };
        let flpms = if (FL_PGTTS >> pgtt) & 1 != 0 && !caps.fl5lp {
            0b01
        } else {
            FLPM_ENCODINGS
        };
        let mut aw = 0;
        while (supported >> pgtt) & 1 != 0 && aw < 8 {
            if (aws >> aw) & 1 != 0 {
                modes[pgtt] |= (flpms as u32) << (4 * aw);
            }
            aw += 1;
        }
        pgtt += 1;
    }
    modes
}

/// By PGTT value, the bits of PASID-entry qwords 0 and 2 that lie beyond the host address
/// width (`beyond_haw`, the bits of a pointer above it) where the type checks them: SLPTPTR
/// with a second level, FLPTPTR with a first level only (a nested FLPTPTR is a guest
/// address).
pub(crate) const fn pointer_limits(beyond_haw: u64) -> [[u64; 2]; 8] {
    let mut limits = [[0; 2]; 8];
    let mut pgtt = 0;
    while pgtt < 8 {
        limits[pgtt][0] = flag((SL_PGTTS >> pgtt) & 1 != 0, beyond_haw);
        limits[pgtt][1] = flag(pgtt == Pgtt::FirstLevel as usize, beyond_haw);
        pgtt += 1;
    }
    limits
}

/// Address of the PASID directory entry of `pasid` in the directory at `pasiddirptr` of
/// size PDTS. A PASID beyond the `2^(PDTS + 7)` entries gives SCT.7.
pub const fn pasid_dir_entry_addr(
    pasiddirptr: u64,
    pdts: u8,
    pasid: Pasid,
) -> Result<u64, FaultReason> {
    let index = pasid.dir_index() as u64;
    if index >> ((pdts as u32 & 0x7) + 7) != 0 {
        Err(FaultReason::Sct7)
    } else {
        Ok((pasiddirptr & PTR_MASK) + index * PASID_DIR_ENTRY_SIZE)
    }
}

/// Address of the entry of `pasid` in the PASID table at `smptblptr`.
pub const fn pasid_entry_addr(smptblptr: u64, pasid: Pasid) -> u64 {
    (smptblptr & PTR_MASK) + pasid.table_index() as u64 * PASID_ENTRY_SIZE
}

/// The PASID directory entry of `pasid` under the context entry `ctx`, decoded and
/// validated. Faults carry the FPD of the context entry and of the directory entry read,
/// present or not; a failed read gives SPD.1.
pub fn read_pasid_dir_entry(
    mem: &impl PhysMem,
    ctx: &ScalableContextEntry,
    pasid: Pasid,
    checks: &EntryChecks,
) -> Result<PasidDirEntry, EntryFault> {
    let fault = |reason, fpd| EntryFault::new(reason, ctx.fpd || fpd);
    let addr = pasid_dir_entry_addr(ctx.pasiddirptr, ctx.pdts, pasid)
        .map_err(|reason| fault(reason, false))?;
    let raw = mem
        .read_u64(addr)
        .map_err(|_| fault(FaultReason::Spd1, false))?;
    if raw & P != 0 && raw & (PDE_RSVD | checks.beyond_haw) == 0 {
        return Ok(PasidDirEntry {
            fpd: raw & FPD != 0,
            smptblptr: raw & PTR_MASK,
        });
    }
    let pde = PasidDirEntry::from_raw(raw).map_err(|reason| fault(reason, raw & FPD != 0))?;
    pde.validate(&checks.caps)
        .map_err(|reason| fault(reason, pde.fpd))?;
    Ok(pde)
}

/// The PASID table entry of `pasid` under the context entry `ctx`: PASID directory entry,
/// then PASID table entry, each checked with the unit's `checks`. Faults
/// carry the OR of the FPD fields of the context, directory and table entries read, present
/// or not; a failed read of the table entry gives SPT.1.
pub fn read_pasid_entry(
    mem: &impl PhysMem,
    ctx: &ScalableContextEntry,
    pasid: Pasid,
    checks: &EntryChecks,
) -> Result<ValidPasidEntry, EntryFault> {
    let pde = read_pasid_dir_entry(mem, ctx, pasid, checks)?;
    let fpd = ctx.fpd || pde.fpd;
    let mut raw = [0; 8];
    mem.read_u64s(pasid_entry_addr(pde.smptblptr, pasid), &mut raw)
        .map_err(|_| EntryFault::new(FaultReason::Spt1, fpd))?;
    ValidPasidEntry::from_raw_checked(raw, checks)
        .map_err(|reason| EntryFault::new(reason, fpd || raw[0] & FPD != 0))
}

/// What the walk from the root table finds for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PasidLookup {
    /// The requester's scalable-mode context entry.
    pub context: ScalableContextEntry,
    /// The PASID the request is translated with (its own, or RID_PASID).
    pub pasid: Pasid,
    /// The PASID table entry of that PASID.
    pub entry: ValidPasidEntry,
}

/// The whole walk above the page tables for a request from `sid`, with or without PASID:
/// root entry, context entry, PASID selection, PASID directory entry, PASID table entry
/// (§3.4.3), each with the fault the spec names for it.
pub fn lookup_pasid_entry(
    mem: &impl PhysMem,
    rta: u64,
    sid: SourceId,
    pasid: Option<Pasid>,
    caps: &Capabilities,
) -> Result<PasidLookup, EntryFault> {
    let checks = EntryChecks::new(caps);
    let context = read_context_entry(mem, rta, sid, &checks)?;
    let pasid = context
        .pasid_for_request(pasid)
        .map_err(|reason| EntryFault::new(reason, context.fpd))?;
    let entry = read_pasid_entry(mem, &context, pasid, &checks)?;
    Ok(PasidLookup {
        context,
        pasid,
        entry,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::context_entry_addr;
    use crate::root::tests::{any_caps, flipped, put, CAPS, CHECKS};
    use crate::root::{root_entry_addr, ScalableRootEntry};
    use crate::testutil::TestMemory;
    use proptest::prelude::*;

    fn pasid(raw: u32) -> Pasid {
        Pasid::new(raw).unwrap()
    }

    /// What Linux writes to bind a guest PASID for nested translation: SL tables at
    /// 0x1_2345_6000 (48-bit AW), domain 0x42, page-walk snoop, guest CR3 0x7_6543_2000,
    /// supervisor requests, 4-level first level.
    fn nested() -> PasidEntry {
        PasidEntry {
            fpd: false,
            aw: SlLevels::Four,
            slee: false,
            pgtt: Pgtt::Nested,
            slade: false,
            slptptr: 0x1_2345_6000,
            did: DomainId(0x42),
            pwsnp: true,
            pgsnp: false,
            cd: false,
            emte: false,
            emt: 0,
            pwt: false,
            pcd: false,
            pat: 0,
            sre: true,
            ere: false,
            flpm: FlPagingMode::FourLevel,
            wpe: false,
            nxe: false,
            smep: false,
            eafe: false,
            flptptr: 0x7_6543_2000,
        }
    }

    /// `entry` as the unit with [`CHECKS`] accepts it.
    fn valid(entry: PasidEntry) -> ValidPasidEntry {
        ValidPasidEntry::from_raw_checked(entry.to_raw(), &CHECKS).unwrap()
    }

    const NESTED_RAW: [u64; 8] = [0x1_2345_60c9, 0x80_0042, 0x7_6543_2001, 0, 0, 0, 0, 0];

    #[test]
    fn nested_entry_matches_the_spec_layout() {
        assert_eq!(nested().to_raw(), NESTED_RAW);
        assert_eq!(PasidEntry::from_raw(NESTED_RAW), Ok(nested()));
    }

    #[test]
    fn new_sets_only_present_pgtt_aw_and_did() {
        // P (bit 0), AW 010b = 4-level (4:2), PGTT 010b = second level (8:6); DID 5 (79:64).
        let raw = PasidEntry::new(Pgtt::SecondLevel, DomainId(5)).to_raw();
        assert_eq!(raw, [0x89, 5, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            PasidEntry::from_raw(raw),
            Ok(PasidEntry::new(Pgtt::SecondLevel, DomainId(5)))
        );
    }

    #[test]
    fn every_field_set_matches_the_spec_layout() {
        let entry = PasidEntry {
            fpd: true,
            aw: SlLevels::Five,
            slee: true,
            pgtt: Pgtt::FirstLevel,
            slade: true,
            slptptr: 0xfff_f000,
            did: DomainId(0xffff),
            pwsnp: true,
            pgsnp: true,
            cd: true,
            emte: true,
            emt: 6,
            pwt: true,
            pcd: true,
            pat: 0x0007_0406,
            sre: true,
            ere: true,
            flpm: FlPagingMode::FiveLevel,
            wpe: true,
            nxe: true,
            smep: true,
            eafe: true,
            flptptr: 0xabc_d000,
        };
        let raw = [
            0x0000_0000_0fff_f26f,
            0x0007_0406_f780_ffff,
            0x0000_0000_0abc_d0f7,
            0,
            0,
            0,
            0,
            0,
        ];
        assert_eq!(entry.to_raw(), raw);
        assert_eq!(PasidEntry::from_raw(raw), Ok(entry));
        assert_eq!(entry.validate(&CAPS), Ok(()));
    }

    #[test]
    fn pgtt_aw_and_flpm_decode_in_place() {
        let mut raw = NESTED_RAW;
        for (bits, pgtt) in [
            (1, Pgtt::FirstLevel),
            (2, Pgtt::SecondLevel),
            (3, Pgtt::Nested),
            (4, Pgtt::PassThrough),
        ] {
            raw[0] = (NESTED_RAW[0] & !0x1c0) | bits << 6;
            assert_eq!(PasidEntry::from_raw(raw).unwrap().pgtt, pgtt);
        }
        raw = NESTED_RAW;
        for (bits, aw) in [
            (1, SlLevels::Three),
            (2, SlLevels::Four),
            (3, SlLevels::Five),
        ] {
            raw[0] = (NESTED_RAW[0] & !0x1c) | bits << 2;
            assert_eq!(PasidEntry::from_raw(raw).unwrap().aw, aw);
        }
        raw = NESTED_RAW;
        raw[2] |= 1 << 2;
        assert_eq!(
            PasidEntry::from_raw(raw).unwrap().flpm,
            FlPagingMode::FiveLevel
        );
    }

    #[test]
    fn not_present_faults_spt2() {
        let mut raw = NESTED_RAW;
        raw[0] &= !P;
        assert_eq!(PasidEntry::from_raw(raw), Err(FaultReason::Spt2));
        assert_eq!(PasidEntry::from_raw([0; 8]), Err(FaultReason::Spt2));
    }

    /// Every reserved bit of the 512-bit entry, as (qword, bit).
    fn reserved_bits() -> Vec<(usize, u32)> {
        (10..12)
            .map(|b| (0, b))
            .chain((16..23).map(|b| (1, b)))
            .chain((8..12).map(|b| (2, b)))
            .chain((3..8).flat_map(|q| (0..64).map(move |b| (q, b))))
            .collect()
    }

    #[test]
    fn every_reserved_bit_faults_spt3() {
        let bits = reserved_bits();
        assert_eq!(bits.len(), 2 + 7 + 4 + 5 * 64);
        for (q, b) in bits {
            let mut raw = NESTED_RAW;
            raw[q] |= 1 << b;
            assert_eq!(
                PasidEntry::from_raw(raw),
                Err(FaultReason::Spt3),
                "bit {}",
                q * 64 + b as usize
            );
        }
    }

    #[test]
    fn reserved_encodings_fault_spt4() {
        for pgtt in [0, 5, 6, 7] {
            let raw = [
                (NESTED_RAW[0] & !0x1c0) | pgtt << 6,
                NESTED_RAW[1],
                NESTED_RAW[2],
                0,
                0,
                0,
                0,
                0,
            ];
            assert_eq!(
                PasidEntry::from_raw(raw),
                Err(FaultReason::Spt4),
                "PGTT {pgtt}"
            );
        }
        for aw in [0, 4, 5, 6, 7] {
            let raw = [
                (NESTED_RAW[0] & !0x1c) | aw << 2,
                NESTED_RAW[1],
                NESTED_RAW[2],
                0,
                0,
                0,
                0,
                0,
            ];
            assert_eq!(PasidEntry::from_raw(raw), Err(FaultReason::Spt4), "AW {aw}");
        }
        for flpm in [2, 3] {
            let raw = [
                NESTED_RAW[0],
                NESTED_RAW[1],
                NESTED_RAW[2] | flpm << 2,
                0,
                0,
                0,
                0,
                0,
            ];
            assert_eq!(
                PasidEntry::from_raw(raw),
                Err(FaultReason::Spt4),
                "FLPM {flpm}"
            );
        }
    }

    #[test]
    fn translation_type_needs_its_capability() {
        let with = |pgtt| PasidEntry { pgtt, ..nested() };
        assert_eq!(with(Pgtt::Nested).validate(&CAPS), Ok(()));
        let cases = [
            (
                Pgtt::FirstLevel,
                Capabilities {
                    flts: false,
                    ..CAPS
                },
            ),
            (
                Pgtt::SecondLevel,
                Capabilities {
                    slts: false,
                    ..CAPS
                },
            ),
            (
                Pgtt::Nested,
                Capabilities {
                    nest: false,
                    ..CAPS
                },
            ),
            (Pgtt::PassThrough, Capabilities { pt: false, ..CAPS }),
        ];
        for (pgtt, caps) in cases {
            assert_eq!(with(pgtt).validate(&CAPS), Ok(()), "{pgtt:?}");
            assert_eq!(
                with(pgtt).validate(&caps),
                Err(FaultReason::Spt4),
                "{pgtt:?}"
            );
        }
    }

    #[test]
    fn address_width_must_be_in_sagaw_when_the_second_level_is_used() {
        let only_39 = Capabilities {
            sagaw: 0b0010,
            ..CAPS
        };
        for pgtt in [Pgtt::SecondLevel, Pgtt::Nested] {
            let entry = PasidEntry { pgtt, ..nested() };
            assert_eq!(entry.validate(&only_39), Err(FaultReason::Spt4), "{pgtt:?}");
            let narrow = PasidEntry {
                aw: SlLevels::Three,
                ..entry
            };
            assert_eq!(narrow.validate(&only_39), Ok(()));
            let wide = PasidEntry {
                slptptr: 1 << 46,
                ..entry
            };
            assert_eq!(wide.validate(&CAPS), Err(FaultReason::Spt4), "{pgtt:?}");
        }
        for pgtt in [Pgtt::FirstLevel, Pgtt::PassThrough] {
            let entry = PasidEntry {
                pgtt,
                slptptr: 1 << 46,
                ..nested()
            };
            assert_eq!(
                entry.validate(&only_39),
                Ok(()),
                "{pgtt:?} ignores AW and SLPTPTR"
            );
        }
    }

    #[test]
    fn five_level_paging_needs_fl5lp_when_the_first_level_is_used() {
        let no_5lp = Capabilities {
            fl5lp: false,
            ..CAPS
        };
        for pgtt in [Pgtt::FirstLevel, Pgtt::Nested] {
            let entry = PasidEntry {
                pgtt,
                flpm: FlPagingMode::FiveLevel,
                ..nested()
            };
            assert_eq!(entry.validate(&no_5lp), Err(FaultReason::Spt4), "{pgtt:?}");
            assert_eq!(entry.validate(&CAPS), Ok(()));
        }
        let sl = PasidEntry {
            pgtt: Pgtt::SecondLevel,
            flpm: FlPagingMode::FiveLevel,
            ..nested()
        };
        assert_eq!(sl.validate(&no_5lp), Ok(()));
    }

    #[test]
    fn first_level_pointer_width_is_checked_only_without_nesting() {
        let far = PasidEntry {
            flptptr: 1 << 46,
            ..nested()
        };
        assert_eq!(far.validate(&CAPS), Ok(()));
        let fl = PasidEntry {
            pgtt: Pgtt::FirstLevel,
            ..far
        };
        assert_eq!(fl.validate(&CAPS), Err(FaultReason::Spt4));
    }

    #[test]
    fn fields_without_their_capability_fault_spt3() {
        let base = PasidEntry {
            sre: false,
            pwsnp: false,
            ..nested()
        };
        let none = Capabilities {
            slads: false,
            srs: false,
            ers: false,
            eafs: false,
            sc: false,
            smpwc: false,
            mts: false,
            ..CAPS
        };
        assert_eq!(base.validate(&none), Ok(()));
        let cases = [
            (
                PasidEntry {
                    slade: true,
                    ..base
                },
                Capabilities {
                    slads: true,
                    ..none
                },
            ),
            (
                PasidEntry { sre: true, ..base },
                Capabilities { srs: true, ..none },
            ),
            (
                PasidEntry { ere: true, ..base },
                Capabilities { ers: true, ..none },
            ),
            (
                PasidEntry { eafe: true, ..base },
                Capabilities { eafs: true, ..none },
            ),
            (
                PasidEntry {
                    pgsnp: true,
                    ..base
                },
                Capabilities { sc: true, ..none },
            ),
            (
                PasidEntry {
                    pwsnp: true,
                    ..base
                },
                Capabilities {
                    smpwc: true,
                    ..none
                },
            ),
            (
                PasidEntry { cd: true, ..base },
                Capabilities { mts: true, ..none },
            ),
            (
                PasidEntry { emte: true, ..base },
                Capabilities { mts: true, ..none },
            ),
            (
                PasidEntry { emt: 6, ..base },
                Capabilities { mts: true, ..none },
            ),
            (
                PasidEntry { pwt: true, ..base },
                Capabilities { mts: true, ..none },
            ),
            (
                PasidEntry { pcd: true, ..base },
                Capabilities { mts: true, ..none },
            ),
            (
                PasidEntry {
                    pat: 0x0606_0606,
                    ..base
                },
                Capabilities { mts: true, ..none },
            ),
        ];
        for (entry, enough) in cases {
            assert_eq!(entry.validate(&none), Err(FaultReason::Spt3), "{entry:?}");
            assert_eq!(entry.validate(&enough), Ok(()), "{entry:?}");
        }
    }

    #[test]
    fn walker_configurations_come_from_the_entry() {
        let entry = PasidEntry {
            wpe: true,
            eafe: true,
            slee: true,
            slade: true,
            ..nested()
        };
        let entry = valid(entry);
        let fl_format = FlFormat::new(46, true).unwrap();
        let sl_format = SlFormat::new(46).unwrap();
        assert_eq!(
            entry.fl_config(fl_format),
            FlConfig {
                root: 0x7_6543_2000,
                mode: FlPagingMode::FourLevel,
                sre: true,
                wpe: true,
                eafe: true,
                format: fl_format,
            }
        );
        assert_eq!(
            entry.sl_config(sl_format),
            SlConfig {
                root: 0x1_2345_6000,
                levels: SlLevels::Four,
                slee: true,
                slade: true,
                format: sl_format,
            }
        );
    }

    #[test]
    fn request_controls() {
        let entry = PasidEntry {
            sre: false,
            ere: false,
            ..nested()
        };
        assert_eq!(entry.check_request(false, false), Ok(()));
        assert_eq!(entry.check_request(true, false), Err(FaultReason::Spt6));
        assert_eq!(entry.check_request(false, true), Err(FaultReason::Spt5));
        let enabled = PasidEntry {
            sre: true,
            ere: true,
            ..entry
        };
        assert_eq!(enabled.check_request(true, true), Ok(()));
    }

    #[test]
    fn directory_entry_layout_and_faults() {
        let pde = PasidDirEntry {
            fpd: true,
            smptblptr: 0x12_3456_7000,
        };
        assert_eq!(pde.to_raw(), 0x12_3456_7003);
        assert_eq!(PasidDirEntry::from_raw(0x12_3456_7003), Ok(pde));
        assert_eq!(
            PasidDirEntry::from_raw(0x12_3456_7002),
            Err(FaultReason::Spd2)
        );
        for b in 2..12 {
            assert_eq!(
                PasidDirEntry::from_raw(0x7001 | 1 << b),
                Err(FaultReason::Spd3),
                "bit {b}"
            );
        }
        let wide = PasidDirEntry {
            fpd: false,
            smptblptr: 1 << 46,
        };
        assert_eq!(wide.validate(&CAPS), Err(FaultReason::Spd3));
        assert_eq!(pde.validate(&CAPS), Ok(()));
    }

    #[test]
    fn entry_addresses() {
        // PASID 0x12345: directory index 0x48d, table index 5.
        let p = pasid(0x12345);
        assert_eq!(
            pasid_dir_entry_addr(0x10_0000, 7, p),
            Ok(0x10_0000 + 0x48d * 8)
        );
        assert_eq!(pasid_entry_addr(0x20_0000, p), 0x20_0000 + 5 * 64);
        // PDTS 3: 1024 directory entries, PASIDs below 0x10000.
        assert_eq!(
            pasid_dir_entry_addr(0x10_0000, 3, p),
            Err(FaultReason::Sct7)
        );
        assert_eq!(
            pasid_dir_entry_addr(0x10_0000, 3, pasid(0xffff)),
            Ok(0x10_0000 + 0x3ff * 8)
        );
        assert_eq!(
            pasid_dir_entry_addr(0x10_0000, 0, pasid(0x2000)),
            Err(FaultReason::Sct7)
        );
    }

    const RTA: u64 = 0x1000;
    const CTP: u64 = 0x2000;
    const DIR: u64 = 0x3000;
    const TABLE: u64 = 0x4000;

    /// Tables for device 00:01.0: root, context (PASIDs on, RID_PASID 0, 128-entry
    /// directory), PASID 0x45's directory entry and table entry.
    fn tables(ctx_fpd: bool) -> (TestMemory, ScalableContextEntry) {
        let mem = TestMemory::new(0x10_0000);
        let root = ScalableRootEntry {
            lctp: Some(CTP),
            uctp: None,
        };
        put(&mem, root_entry_addr(RTA, 0), &root.to_raw());
        let ctx = ScalableContextEntry {
            fpd: ctx_fpd,
            paside: true,
            pasiddirptr: DIR,
            ..Default::default()
        };
        put(&mem, context_entry_addr(CTP, 0x08), &ctx.to_raw());
        let pde = PasidDirEntry {
            fpd: false,
            smptblptr: TABLE,
        };
        put(&mem, DIR + 8, &[pde.to_raw()]);
        put(
            &mem,
            pasid_entry_addr(TABLE, pasid(0x45)),
            &nested().to_raw(),
        );
        (mem, ctx)
    }

    #[test]
    fn walk_reaches_the_pasid_entry() {
        let (mem, ctx) = tables(false);
        let sid = SourceId::new(0, 1, 0).unwrap();
        assert_eq!(
            read_pasid_entry(&mem, &ctx, pasid(0x45), &CHECKS),
            Ok(valid(nested()))
        );
        let found = lookup_pasid_entry(&mem, RTA, sid, Some(pasid(0x45)), &CAPS).unwrap();
        assert_eq!(
            found,
            PasidLookup {
                context: ctx,
                pasid: pasid(0x45),
                entry: valid(nested())
            }
        );

        // Without PASID: RID_PASID 0, whose directory entry is not present.
        assert_eq!(
            lookup_pasid_entry(&mem, RTA, sid, None, &CAPS),
            Err(EntryFault::new(FaultReason::Spd2, false))
        );
        put(
            &mem,
            DIR,
            &[PasidDirEntry {
                fpd: false,
                smptblptr: TABLE,
            }
            .to_raw()],
        );
        assert_eq!(
            lookup_pasid_entry(&mem, RTA, sid, None, &CAPS),
            Err(EntryFault::new(FaultReason::Spt2, false))
        );
    }

    #[test]
    fn walk_faults_in_order_with_their_fpd() {
        let (mem, ctx) = tables(false);
        let read = |mem: &TestMemory, p| read_pasid_entry(mem, &ctx, pasid(p), &CHECKS);
        let fault = |reason, fpd| Err(EntryFault::new(reason, fpd));

        // Beyond the 128-entry directory.
        assert_eq!(read(&mem, 0x2000), fault(FaultReason::Sct7, false));
        // Directory entry not present, then not present with FPD, then reserved bits.
        assert_eq!(read(&mem, 0x80), fault(FaultReason::Spd2, false));
        put(&mem, DIR + 16, &[FPD]);
        assert_eq!(read(&mem, 0x80), fault(FaultReason::Spd2, true));
        put(&mem, DIR + 16, &[0x5000 | P | 1 << 4]);
        assert_eq!(read(&mem, 0x80), fault(FaultReason::Spd3, false));
        // Table entry not present; with FPD in the table entry; with FPD in the directory.
        assert_eq!(read(&mem, 0x46), fault(FaultReason::Spt2, false));
        put(&mem, pasid_entry_addr(TABLE, pasid(0x46)), &[FPD]);
        assert_eq!(read(&mem, 0x46), fault(FaultReason::Spt2, true));
        put(&mem, DIR + 8, &[TABLE | P | FPD]);
        assert_eq!(read(&mem, 0x47), fault(FaultReason::Spt2, true));
        put(&mem, DIR + 8, &[TABLE | P]);
        // Reserved bit, invalid programming.
        let mut raw = NESTED_RAW;
        raw[5] = 1;
        put(&mem, pasid_entry_addr(TABLE, pasid(0x47)), &raw);
        assert_eq!(read(&mem, 0x47), fault(FaultReason::Spt3, false));
        let only_39 = Capabilities {
            sagaw: 0b0010,
            ..CAPS
        };
        assert_eq!(
            read_pasid_entry(&mem, &ctx, pasid(0x45), &EntryChecks::new(&only_39)),
            fault(FaultReason::Spt4, false)
        );

        // A context entry with FPD disables everything below it.
        let (mem, ctx) = tables(true);
        let read = |p| read_pasid_entry(&mem, &ctx, pasid(p), &CHECKS);
        assert_eq!(read(0x2000), fault(FaultReason::Sct7, true));
        assert_eq!(read(0x80), fault(FaultReason::Spd2, true));
        assert_eq!(read(0x46), fault(FaultReason::Spt2, true));
    }

    #[test]
    fn unreadable_tables_fault_spd1_and_spt1() {
        let (mem, ctx) = tables(false);
        let far_dir = ScalableContextEntry {
            pasiddirptr: 0x20_0000,
            ..ctx
        };
        assert_eq!(
            read_pasid_entry(&mem, &far_dir, pasid(0x45), &CHECKS),
            Err(EntryFault::new(FaultReason::Spd1, false))
        );
        put(&mem, DIR + 8, &[0x20_0000 | P | FPD]);
        assert_eq!(
            read_pasid_entry(&mem, &ctx, pasid(0x45), &CHECKS),
            Err(EntryFault::new(FaultReason::Spt1, true))
        );
    }

    #[test]
    fn lookup_checks_the_request_pasid_against_the_context() {
        let (mem, _) = tables(false);
        let sid = SourceId::new(0, 1, 0).unwrap();
        let no_pasid = ScalableContextEntry {
            pasiddirptr: DIR,
            ..Default::default()
        };
        put(&mem, context_entry_addr(CTP, 0x08), &no_pasid.to_raw());
        assert_eq!(
            lookup_pasid_entry(&mem, RTA, sid, Some(pasid(0x45)), &CAPS),
            Err(EntryFault::new(FaultReason::Sct6, false))
        );
        let other = SourceId::new(0, 2, 0).unwrap();
        assert_eq!(
            lookup_pasid_entry(&mem, RTA, other, Some(pasid(0x45)), &CAPS),
            Err(EntryFault::new(FaultReason::Sct2, false))
        );
    }

    fn any_pgtt() -> impl Strategy<Value = Pgtt> {
        prop_oneof![
            Just(Pgtt::FirstLevel),
            Just(Pgtt::SecondLevel),
            Just(Pgtt::Nested),
            Just(Pgtt::PassThrough),
        ]
    }

    fn any_aw() -> impl Strategy<Value = SlLevels> {
        prop_oneof![
            Just(SlLevels::Three),
            Just(SlLevels::Four),
            Just(SlLevels::Five),
        ]
    }

    fn any_entry() -> impl Strategy<Value = PasidEntry> {
        let q0 = (
            any::<bool>(),
            any_aw(),
            any::<bool>(),
            any_pgtt(),
            any::<bool>(),
            any::<u64>(),
        );
        let q1 = (any::<u16>(), any::<[bool; 6]>(), 0u8..8, any::<u32>());
        let q2 = (
            any::<[bool; 6]>(),
            prop_oneof![Just(FlPagingMode::FourLevel), Just(FlPagingMode::FiveLevel)],
            any::<u64>(),
        );
        (q0, q1, q2).prop_map(
            |((fpd, aw, slee, pgtt, slade, sl), (did, b1, emt, pat), (b2, flpm, fl))| PasidEntry {
                fpd,
                aw,
                slee,
                pgtt,
                slade,
                slptptr: sl & PTR_MASK,
                did: DomainId(did),
                pwsnp: b1[0],
                pgsnp: b1[1],
                cd: b1[2],
                emte: b1[3],
                emt,
                pwt: b1[4],
                pcd: b1[5],
                pat,
                sre: b2[0],
                ere: b2[1],
                flpm,
                wpe: b2[2],
                nxe: b2[3],
                smep: b2[4],
                eafe: b2[5],
                flptptr: fl & PTR_MASK,
            },
        )
    }

    /// Any 512 bits, mostly near a valid entry: an encoded entry with up to three bits
    /// flipped, or eight random qwords; half of them with both table pointers below 2^39,
    /// inside every unit's address width.
    fn any_raw_entry() -> impl Strategy<Value = [u64; 8]> {
        let raw = prop_oneof![
            4 => flipped(any_entry().prop_map(|e| e.to_raw()), 3),
            1 => any::<[u64; 8]>(),
        ];
        (raw, any::<bool>()).prop_map(|(mut raw, low)| {
            if low {
                raw[0] &= (1 << 39) - 1;
                raw[2] &= (1 << 39) - 1;
            }
            raw
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn word_checks_agree_with_the_field_checks(raw in any_raw_entry(), caps in any_caps()) {
            let by_fields = PasidEntry::from_raw(raw).and_then(|e| e.validate(&caps).map(|()| e));
            let checked = ValidPasidEntry::from_raw_checked(raw, &EntryChecks::new(&caps));
            prop_assert_eq!(checked.map(|v| v.decode()), by_fields);
            if let Ok(v) = checked {
                prop_assert_eq!(v.words(), [raw[0], raw[1], raw[2]]);
            }
        }

        #[test]
        fn dir_word_checks_agree_with_the_field_checks(raw: u64, caps in any_caps()) {
            let raw = raw & !(0xff0 & raw >> 8); // reserved bits clear half the time
            let mem = TestMemory::new(0x10_0000);
            let ctx = ScalableContextEntry { pasiddirptr: 0x1000, ..Default::default() };
            mem.write_u64(0x1000, raw).unwrap();
            let by_fields = PasidDirEntry::from_raw(raw)
                .and_then(|e| e.validate(&caps).map(|()| e))
                .map_err(|reason| EntryFault::new(reason, raw & FPD != 0));
            let checks = EntryChecks::new(&caps);
            prop_assert_eq!(read_pasid_dir_entry(&mem, &ctx, pasid(0), &checks), by_fields);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn pasid_entry_round_trips(entry in any_entry()) {
            let raw = entry.to_raw();
            prop_assert_eq!(PasidEntry::from_raw(raw), Ok(entry));
            prop_assert_eq!(&raw[3..], &[0u64; 5][..]);
        }

        #[test]
        fn any_reserved_bit_is_rejected(entry in any_entry(), pick in any::<prop::sample::Index>()) {
            let bits = reserved_bits();
            let (q, b) = bits[pick.index(bits.len())];
            let mut raw = entry.to_raw();
            raw[q] |= 1 << b;
            prop_assert_eq!(PasidEntry::from_raw(raw), Err(FaultReason::Spt3));
        }

        #[test]
        fn dir_entry_round_trips(fpd: bool, ptr: u64) {
            let pde = PasidDirEntry { fpd, smptblptr: ptr & PTR_MASK };
            prop_assert_eq!(PasidDirEntry::from_raw(pde.to_raw()), Ok(pde));
        }
    }
}
