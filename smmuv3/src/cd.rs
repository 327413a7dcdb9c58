//! Context descriptors (IHI 0070 §5.4): 64 bytes that give stage 1 of one substream its
//! translation table (TTB0/TTB1 with their TCR-like controls), MAIR and ASID; and the
//! level-1 descriptors of 2-level CD tables (§5.3, L1CD).
//!
//! [`ContextDescriptor::decode`] applies the C_BAD_CD rules (§5.4, "CD validity"): V = 0,
//! AArch32 (AA64 = 0) or big-endian (ENDI) tables, a granule the SMMU does not implement
//! or T0SZ/T1SZ outside its range for an enabled TTB0/TTB1, an ASID beyond 8 bits without
//! IDR0.ASID16, a stall setting the STALL_MODEL forbids. vsva also refuses nonzero RES0
//! bits and reserved encodings.

use crate::features::{Features, StallModel};
use crate::field::{bits, get, put};
use crate::ste::Granule;
use crate::walk::{AddressSize, S1Config, S1Flags, S1Table, TableConfigError};
use std::fmt;

/// Why a CD is C_BAD_CD.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum BadCd {
    /// V = 0.
    #[error("CD not valid (V = 0)")]
    NotValid,
    /// A RES0 bit is set.
    #[error("reserved bits {bits:#x} set in CD word {word}")]
    ReservedBits {
        /// The word (0 to 7).
        word: usize,
        /// The RES0 bits set in it.
        bits: u64,
    },
    /// A field holds a reserved encoding.
    #[error("reserved encoding {value:#x} in CD.{field}")]
    ReservedEncoding {
        /// The field's spec name.
        field: &'static str,
        /// The value found.
        value: u64,
    },
    /// AA64 = 0: AArch32 tables.
    #[error("AArch32 stage-1 tables are not supported")]
    AArch32,
    /// ENDI = 1: big-endian tables.
    #[error("big-endian stage-1 tables are not supported")]
    BigEndian,
    /// TG0 or TG1 of an enabled table names a granule the SMMU does not implement.
    #[error("stage-1 granule {0:?} is not supported")]
    Granule(Granule),
    /// T0SZ or T1SZ of an enabled table is outside the granule's range.
    #[error(transparent)]
    Table(TableConfigError),
    /// An ASID above 8 bits without IDR0.ASID16.
    #[error("ASID {0:#x} needs 16-bit ASIDs")]
    Asid(u16),
    /// CD.S contradicts IDR0.STALL_MODEL.
    #[error("CD.S not allowed by the stall model {0:?}")]
    Stall(StallModel),
}

/// A valid context descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ContextDescriptor {
    /// T0SZ: the TTB0 VA range is 2^(64 - T0SZ) bytes.
    pub t0sz: u8,
    /// TG0.
    pub tg0: Granule,
    /// IR0: inner cacheability of TTB0 walks.
    pub ir0: u8,
    /// OR0: outer cacheability of TTB0 walks.
    pub or0: u8,
    /// SH0: shareability of TTB0 walks.
    pub sh0: u8,
    /// EPD0: TTB0 walks disabled.
    pub epd0: bool,
    /// ENDI: big-endian tables.
    pub endi: bool,
    /// T1SZ.
    pub t1sz: u8,
    /// TG1 as encoded (0b01 16 KiB, 0b10 4 KiB, 0b11 64 KiB: not TG0's encoding; see
    /// [`ContextDescriptor::tg1_granule`]).
    pub tg1: u8,
    /// IR1.
    pub ir1: u8,
    /// OR1.
    pub or1: u8,
    /// SH1.
    pub sh1: u8,
    /// EPD1: TTB1 walks disabled.
    pub epd1: bool,
    /// IPS: the intermediate physical (stage-1 output) size.
    pub ips: AddressSize,
    /// AFFD: Access flag fault disable.
    pub affd: bool,
    /// WXN: writable implies execute-never.
    pub wxn: bool,
    /// UWXN: unprivileged-writable implies privileged execute-never (AArch32 tables).
    pub uwxn: bool,
    /// `TBI[1:0]`: top byte ignore for TTB0 (bit 0) and TTB1 (bit 1).
    pub tbi: u8,
    /// PAN: privileged access never.
    pub pan: bool,
    /// AA64: AArch64 tables.
    pub aa64: bool,
    /// HD: hardware dirty state update.
    pub hd: bool,
    /// HA: hardware Access flag update.
    pub ha: bool,
    /// S: stall faults.
    pub s: bool,
    /// R: record faults.
    pub r: bool,
    /// A: abort terminated transactions (else RAZ/WI).
    pub a: bool,
    /// ASET: the ASID is not shared with the PEs (broadcast TLB maintenance ignored).
    pub aset: bool,
    /// ASID.
    pub asid: u16,
    /// TTB0: the TTB0 table's address (bits 51:4; an IPA when stage 2 translates).
    pub ttb0: u64,
    /// TTB1 (bits 51:4).
    pub ttb1: u64,
    /// MAIR: MAIR0 (bits 31:0) and MAIR1 (bits 63:32).
    pub mair: u64,
    /// AMAIR: AMAIR0 and AMAIR1.
    pub amair: u64,
    /// IMPLEMENTATION DEFINED word 5 bits 31:0.
    pub impl_def: u32,
}

/// The RES0 bits of each word (word 1/2 bits 3:0 hold NSCFG and HAD, which need secure
/// streams and IDR3.HAD that vsva does not implement).
const RES0: [u64; 8] = [
    0,
    bits(3, 0) | bits(63, 52),
    bits(3, 0) | bits(63, 52),
    0,
    0,
    bits(63, 32),
    u64::MAX,
    u64::MAX,
];

impl ContextDescriptor {
    /// A CD for the 4 KiB-granule TTB0 table at `ttb0` covering `64 - t0sz` bits with
    /// `asid`: AArch64, TTB1 disabled, 48-bit IPS, R and A set (fault records, abort on
    /// termination), everything else zero.
    pub const fn new(ttb0: u64, t0sz: u8, asid: u16) -> Self {
        ContextDescriptor {
            t0sz,
            tg0: Granule::Size4K,
            ir0: 0,
            or0: 0,
            sh0: 0,
            epd0: false,
            endi: false,
            t1sz: 0,
            tg1: 0b10,
            ir1: 0,
            or1: 0,
            sh1: 0,
            epd1: true,
            ips: AddressSize::Bits48,
            affd: false,
            wxn: false,
            uwxn: false,
            tbi: 0,
            pan: false,
            aa64: true,
            hd: false,
            ha: false,
            s: false,
            r: true,
            a: true,
            aset: false,
            asid,
            ttb0,
            ttb1: 0,
            mair: 0,
            amair: 0,
            impl_def: 0,
        }
    }

    /// The eight words of the descriptor, with V set. Field values wider than their field
    /// are truncated to it.
    pub fn encode(&self) -> [u64; 8] {
        let flag = |b: bool, bit: u32| (b as u64) << bit;
        [
            put(self.t0sz as u64, 5, 0)
                | put(self.tg0.raw(), 7, 6)
                | put(self.ir0 as u64, 9, 8)
                | put(self.or0 as u64, 11, 10)
                | put(self.sh0 as u64, 13, 12)
                | flag(self.epd0, 14)
                | flag(self.endi, 15)
                | put(self.t1sz as u64, 21, 16)
                | put(self.tg1 as u64, 23, 22)
                | put(self.ir1 as u64, 25, 24)
                | put(self.or1 as u64, 27, 26)
                | put(self.sh1 as u64, 29, 28)
                | flag(self.epd1, 30)
                | 1 << 31
                | put(self.ips.raw(), 34, 32)
                | flag(self.affd, 35)
                | flag(self.wxn, 36)
                | flag(self.uwxn, 37)
                | put(self.tbi as u64, 39, 38)
                | flag(self.pan, 40)
                | flag(self.aa64, 41)
                | flag(self.hd, 42)
                | flag(self.ha, 43)
                | flag(self.s, 44)
                | flag(self.r, 45)
                | flag(self.a, 46)
                | flag(self.aset, 47)
                | put(self.asid as u64, 63, 48),
            self.ttb0 & bits(51, 4),
            self.ttb1 & bits(51, 4),
            self.mair,
            self.amair,
            self.impl_def as u64,
            0,
            0,
        ]
    }

    /// Decodes the descriptor `raw` and checks it against `features`: the descriptor, or
    /// why it is C_BAD_CD.
    pub fn decode(raw: &[u64; 8], features: &Features) -> Result<Self, BadCd> {
        let w0 = raw[0];
        if w0 & 1 << 31 == 0 {
            return Err(BadCd::NotValid);
        }
        for (word, (&w, &res0)) in raw.iter().zip(&RES0).enumerate() {
            if w & res0 != 0 {
                return Err(BadCd::ReservedBits {
                    word,
                    bits: w & res0,
                });
            }
        }
        let reserved = |field, value| BadCd::ReservedEncoding { field, value };
        let tg0 = get(w0, 7, 6);
        let ips = get(w0, 34, 32);
        let cd = ContextDescriptor {
            t0sz: get(w0, 5, 0) as u8,
            tg0: Granule::from_bits(tg0).ok_or(reserved("TG0", tg0))?,
            ir0: get(w0, 9, 8) as u8,
            or0: get(w0, 11, 10) as u8,
            sh0: get(w0, 13, 12) as u8,
            epd0: w0 & 1 << 14 != 0,
            endi: w0 & 1 << 15 != 0,
            t1sz: get(w0, 21, 16) as u8,
            tg1: get(w0, 23, 22) as u8,
            ir1: get(w0, 25, 24) as u8,
            or1: get(w0, 27, 26) as u8,
            sh1: get(w0, 29, 28) as u8,
            epd1: w0 & 1 << 30 != 0,
            ips: AddressSize::from_bits(ips).ok_or(reserved("IPS", ips))?,
            affd: w0 & 1 << 35 != 0,
            wxn: w0 & 1 << 36 != 0,
            uwxn: w0 & 1 << 37 != 0,
            tbi: get(w0, 39, 38) as u8,
            pan: w0 & 1 << 40 != 0,
            aa64: w0 & 1 << 41 != 0,
            hd: w0 & 1 << 42 != 0,
            ha: w0 & 1 << 43 != 0,
            s: w0 & 1 << 44 != 0,
            r: w0 & 1 << 45 != 0,
            a: w0 & 1 << 46 != 0,
            aset: w0 & 1 << 47 != 0,
            asid: get(w0, 63, 48) as u16,
            ttb0: raw[1] & bits(51, 4),
            ttb1: raw[2] & bits(51, 4),
            mair: raw[3],
            amair: raw[4],
            impl_def: raw[5] as u32,
        };
        if cd.tg1 == 0 {
            return Err(reserved("TG1", 0));
        }
        cd.check(features)?;
        Ok(cd)
    }

    fn check(&self, f: &Features) -> Result<(), BadCd> {
        if !self.aa64 {
            return Err(BadCd::AArch32);
        }
        if self.endi {
            return Err(BadCd::BigEndian);
        }
        if !self.epd0 {
            if !f.has_granule(self.tg0) {
                return Err(BadCd::Granule(self.tg0));
            }
            S1Table::ttb0(self.ttb0, self.t0sz, self.tg0).map_err(BadCd::Table)?;
        }
        if !self.epd1 {
            let tg1 = self.tg1_granule();
            if !f.has_granule(tg1) {
                return Err(BadCd::Granule(tg1));
            }
            S1Table::ttb1(self.ttb1, self.t1sz, tg1).map_err(BadCd::Table)?;
        }
        if !f.asid16 && self.asid > 0xff {
            return Err(BadCd::Asid(self.asid));
        }
        let stall_ok = match f.stall_model {
            StallModel::StallAndTerminate => true,
            StallModel::Terminate => !self.s,
            StallModel::ForceStall => self.s,
        };
        if !stall_ok {
            return Err(BadCd::Stall(f.stall_model));
        }
        Ok(())
    }

    /// The granule TG1 names (decoding refuses the reserved 0b00).
    pub const fn tg1_granule(&self) -> Granule {
        match Granule::from_tg1(self.tg1 as u64) {
            Some(g) => g,
            None => Granule::Size4K,
        }
    }

    /// The stage-1 configuration: the TTB0 table with T0SZ and TG0 (a placeholder when
    /// EPD0 disables it), the TTB1 table with T1SZ and TG1 unless EPD1, the IPS capped by
    /// OAS, the HA and HD that IDR0.HTTU allows, AFFD, WXN, PAN, TBI0/TBI1, EPD0.
    pub fn s1_config(&self, f: &Features) -> Result<S1Config, BadCd> {
        let (ha, hd) = f.hardware_updates(self.ha, self.hd);
        let flags = S1Flags {
            ha,
            hd,
            affd: self.affd,
            wxn: self.wxn,
            pan: self.pan,
            tbi: self.tbi & 1 != 0,
            epd0: self.epd0,
            tbi1: self.tbi & 2 != 0,
        };
        // With EPD0 the table is never walked; T0SZ and TG0 then need not be valid.
        let ttb0 = if self.epd0 {
            S1Table::ttb0(self.ttb0, 39, Granule::Size4K)
        } else {
            S1Table::ttb0(self.ttb0, self.t0sz, self.tg0)
        };
        let ttb1 = if self.epd1 {
            None
        } else {
            Some(S1Table::ttb1(self.ttb1, self.t1sz, self.tg1_granule()).map_err(BadCd::Table)?)
        };
        let ttb0 = ttb0.map_err(BadCd::Table)?;
        let ips = f.cap_oas(self.ips);
        Ok(S1Config::with_tables(ttb0, ttb1, ips, f.lpa(), flags))
    }
}

/// One line for `explain`: the ASID, TTB0 (and TTB1 when enabled) and the walk controls.
impl fmt::Display for ContextDescriptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.epd1 {
            write!(
                f,
                "TTB1={:#x} T1SZ={} TG1={:?} ",
                self.ttb1,
                self.t1sz,
                self.tg1_granule()
            )?;
        }
        write!(
            f,
            "CD ASID={:#x} TTB0={:#x} T0SZ={} TG0={:?} IPS={}b EPD0={} EPD1={} HA={} HD={} AFFD={} WXN={} PAN={} TBI={}",
            self.asid,
            self.ttb0,
            self.t0sz,
            self.tg0,
            self.ips.bits(),
            self.epd0 as u8,
            self.epd1 as u8,
            self.ha as u8,
            self.hd as u8,
            self.affd as u8,
            self.wxn as u8,
            self.pan as u8,
            self.tbi
        )
    }
}

/// A level-1 CD table descriptor (§5.3): a pointer to a leaf table of CDs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct L1Cd(pub u64);

impl L1Cd {
    /// V: the leaf table is valid.
    pub const V: u64 = 1;
    /// L2Ptr: the leaf table's address, bits 51:12.
    pub const L2PTR: u64 = bits(51, 12);

    /// A valid descriptor pointing to the leaf table at `l2ptr` (4 KiB aligned).
    pub const fn new(l2ptr: u64) -> Self {
        L1Cd((l2ptr & Self::L2PTR) | Self::V)
    }

    /// The leaf table's address if V is set and no RES0 bit is.
    pub const fn l2ptr(self) -> Option<u64> {
        if self.0 & !(Self::L2PTR | Self::V) == 0 && self.0 & Self::V != 0 {
            Some(self.0 & Self::L2PTR)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::Httu;
    use crate::testutil::count_hits;
    use proptest::prelude::*;

    fn linux_cd() -> ContextDescriptor {
        ContextDescriptor {
            ir0: 1,
            or0: 1,
            sh0: 3,
            mair: 0x0000_00ff_4404_0400,
            ..ContextDescriptor::new(0x4000_0000, 16, 0x1234)
        }
    }

    #[test]
    fn hand_computed_encoding() {
        let raw = linux_cd().encode();
        assert_eq!(
            raw,
            [
                0x1234_6205_c080_3510,
                0x4000_0000,
                0,
                0x0000_00ff_4404_0400,
                0,
                0,
                0,
                0
            ]
        );
        assert_eq!(
            ContextDescriptor::decode(&raw, &Features::VSVA),
            Ok(linux_cd())
        );
        let s1 = linux_cd().s1_config(&Features::VSVA).unwrap();
        assert_eq!(
            (s1.root(), s1.start_level(), s1.output_bits()),
            (0x4000_0000, 0, 48)
        );
        assert_eq!(L1Cd::new(0x12_3000).0, 0x12_3001);
        assert_eq!(L1Cd::new(0x12_3000).l2ptr(), Some(0x12_3000));
        assert_eq!(L1Cd(0x12_3000).l2ptr(), None);
        assert_eq!(L1Cd(0x12_3003).l2ptr(), None);
    }

    #[test]
    fn bad_cd_rules() {
        let f = Features::VSVA;
        let with = |i: usize, set: u64, clear: u64| {
            let mut raw = linux_cd().encode();
            raw[i] = (raw[i] | set) & !clear;
            ContextDescriptor::decode(&raw, &f)
        };
        assert_eq!(with(0, 0, 1 << 31), Err(BadCd::NotValid));
        assert_eq!(
            with(1, 1 << 1, 0),
            Err(BadCd::ReservedBits { word: 1, bits: 2 })
        );
        assert_eq!(with(6, 1, 0), Err(BadCd::ReservedBits { word: 6, bits: 1 }));
        assert_eq!(
            with(0, 3 << 6, 0),
            Err(BadCd::ReservedEncoding {
                field: "TG0",
                value: 3
            })
        );
        assert_eq!(
            with(0, 7 << 32, 0),
            Err(BadCd::ReservedEncoding {
                field: "IPS",
                value: 7
            })
        );
        assert_eq!(
            with(0, 0, 3 << 22),
            Err(BadCd::ReservedEncoding {
                field: "TG1",
                value: 0
            })
        );
        assert_eq!(with(0, 0, 1 << 41), Err(BadCd::AArch32));
        assert_eq!(with(0, 1 << 15, 0), Err(BadCd::BigEndian));
        let check =
            |cd: ContextDescriptor, f: &Features| ContextDescriptor::decode(&cd.encode(), f);
        // A granule the SMMU lacks, for TTB0 or for an enabled TTB1.
        let tg0_64k = ContextDescriptor {
            tg0: Granule::Size64K,
            ..linux_cd()
        };
        let no_64k = Features {
            gran64k: false,
            ..f
        };
        assert_eq!(check(tg0_64k, &f), Ok(tg0_64k));
        assert_eq!(
            check(tg0_64k, &no_64k),
            Err(BadCd::Granule(Granule::Size64K))
        );
        let ttb1_16k = ContextDescriptor {
            epd1: false,
            t1sz: 25,
            tg1: 0b01,
            ttb1: 0x9_0000,
            ..linux_cd()
        };
        assert_eq!(check(ttb1_16k, &f), Ok(ttb1_16k));
        assert_eq!(
            check(
                ttb1_16k,
                &Features {
                    gran16k: false,
                    ..f
                }
            ),
            Err(BadCd::Granule(Granule::Size16K))
        );
        // EPD1 disables TTB1: its size and granule are not checked.
        let t1_off = ContextDescriptor {
            t1sz: 60,
            ..ttb1_16k
        };
        assert_eq!(
            check(t1_off, &no_64k),
            Err(BadCd::Table(TableConfigError::T1sz(60)))
        );
        assert_eq!(
            check(
                ContextDescriptor {
                    epd1: true,
                    ..t1_off
                },
                &f
            )
            .map(|c| c.t1sz),
            Ok(60)
        );
        for t0sz in [15, 40] {
            assert_eq!(
                check(ContextDescriptor { t0sz, ..linux_cd() }, &f),
                Err(BadCd::Table(TableConfigError::T0sz(t0sz)))
            );
        }
        // With EPD0, TTB0's controls are ignored; every walk is a Translation fault.
        let off = ContextDescriptor {
            t0sz: 0,
            tg0: Granule::Size16K,
            epd0: true,
            ..linux_cd()
        };
        assert_eq!(check(off, &f), Ok(off));
        assert!(off.s1_config(&f).unwrap().flags().epd0);
        assert_eq!(
            check(linux_cd(), &Features { asid16: false, ..f }),
            Err(BadCd::Asid(0x1234))
        );
        assert_eq!(
            check(
                ContextDescriptor {
                    s: true,
                    ..linux_cd()
                },
                &f
            ),
            Err(BadCd::Stall(StallModel::Terminate))
        );
        let forced = Features {
            stall_model: StallModel::ForceStall,
            ..f
        };
        assert_eq!(
            check(linux_cd(), &forced),
            Err(BadCd::Stall(StallModel::ForceStall))
        );
        // TTB1 walks: TG1's own encoding (0b01 is 16 KiB), T1SZ, TBI1 from TBI bit 1.
        let s1 = ContextDescriptor { tbi: 2, ..ttb1_16k }
            .s1_config(&f)
            .unwrap();
        let t1 = s1.ttb1().unwrap();
        assert_eq!(
            (t1.root(), t1.tsz(), t1.granule()),
            (0x9_0000, 25, Granule::Size16K)
        );
        assert_eq!(t1.start_level(), 1);
        assert!(s1.flags().tbi1 && !s1.flags().tbi);
        assert_eq!(linux_cd().s1_config(&f).unwrap().ttb1(), None);
        // IPS capped by OAS and the granule; HA/HD as HTTU allows.
        let cd = ContextDescriptor {
            ips: AddressSize::Bits52,
            ha: true,
            hd: true,
            ..linux_cd()
        };
        let s1 = cd
            .s1_config(&Features {
                oas: AddressSize::Bits44,
                ..f
            })
            .unwrap();
        assert_eq!(s1.output_bits(), 44);
        assert_eq!((s1.flags().ha, s1.flags().hd), (true, true));
        assert_eq!(cd.s1_config(&f).unwrap().output_bits(), 48);
        let none = cd
            .s1_config(&Features {
                httu: Httu::None,
                ..f
            })
            .unwrap();
        assert_eq!((none.flags().ha, none.flags().hd), (false, false));
    }

    /// Decoding never panics, and a decoded CD encodes back to the same words.
    #[test]
    fn decode_encode_round_trip() {
        let words = (
            prop::array::uniform6(any::<u64>()),
            prop::array::uniform6(any::<u64>()),
        );
        let hits = count_hits(512, &words, |(w, mask)| {
            let mut raw = [0u64; 8];
            for i in 0..6 {
                raw[i] = w[i] & mask[i] & !RES0[i];
            }
            raw[0] |= 1 << 31 | 1 << 41 | 2 << 22;
            // An enabled TTB1 (EPD1 = 0) needs a T1SZ in range, as TTB0 needs a T0SZ.
            if raw[0] & 1 << 30 == 0 {
                raw[0] = (raw[0] & !bits(21, 16)) | 25 << 16;
            }
            let Ok(cd) = ContextDescriptor::decode(&raw, &Features::VSVA) else {
                return Ok(false);
            };
            prop_assert_eq!(cd.encode(), raw);
            Ok(true)
        });
        println!("CD round trip: {hits} of 512 decoded");
        assert!(hits >= 50, "only {hits} of 512 random descriptors decoded");
    }
}
