//! Stream table entries (IHI 0070 §5.2): 64 bytes, eight little-endian 64-bit words, that
//! say how the transactions of one StreamID are translated.
//!
//! [`Ste::decode`] applies the C_BAD_STE rules (§5.2, "STE validity"): V = 0, a reserved
//! Config, a stage the SMMU lacks (IDR0.S1P/S2P), S1CDMax beyond IDR1.SSIDSIZE, a 2-level
//! CD table without IDR0.CD2L, EATS without IDR0.ATS, STRW = EL2 without IDR0.Hyp, a VMID
//! beyond 8 bits without VMID16, AArch32 or big-endian stage-2 tables, an unsupported
//! granule, an inconsistent S2T0SZ/S2SL0, S2TTB beyond the effective S2PS, and stall
//! settings the STALL_MODEL forbids. vsva also refuses, as C_BAD_STE, nonzero RES0 bits
//! and reserved encodings in any field, used by the Config or not.

use crate::features::{Features, StallModel};
use crate::field::{bits, field_enum, get, put};
use crate::walk::{AddressSize, PageSize, S2Config, S2Flags, TableConfigError};
use std::fmt;

field_enum! {
    /// STE.Config: which stages translate (§5.2).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub enum Config {
        /// 0b000: abort every transaction, record no event.
        Abort = 0b000,
        /// 0b100: both stages bypassed.
        Bypass = 0b100,
        /// 0b101: stage 1 translates, stage 2 bypassed.
        S1Trans = 0b101,
        /// 0b110: stage 1 bypassed, stage 2 translates.
        S2Trans = 0b110,
        /// 0b111: nested, both stages translate.
        Nested = 0b111,
    }
}

impl Config {
    /// Whether stage 1 translates.
    pub const fn stage1(self) -> bool {
        matches!(self, Config::S1Trans | Config::Nested)
    }

    /// Whether stage 2 translates.
    pub const fn stage2(self) -> bool {
        matches!(self, Config::S2Trans | Config::Nested)
    }
}

field_enum! {
    /// STE.S1Fmt: the CD table format (§5.2).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub enum S1Fmt {
        /// A linear table of 2^S1CDMax CDs.
        Linear = 0,
        /// Two levels, 4 KiB leaf tables of 64 CDs (SubstreamID split at bit 6).
        TwoLevel4K = 1,
        /// Two levels, 64 KiB leaf tables of 1024 CDs (split at bit 10).
        TwoLevel64K = 2,
    }
}

impl S1Fmt {
    /// The SubstreamID bits a leaf table resolves (`None` for a linear table).
    pub const fn split(self) -> Option<u32> {
        match self {
            S1Fmt::Linear => None,
            S1Fmt::TwoLevel4K => Some(6),
            S1Fmt::TwoLevel64K => Some(10),
        }
    }
}

field_enum! {
    /// STE.S1DSS: what a transaction without a SubstreamID does when substreams are
    /// enabled (§5.2).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub enum S1Dss {
        /// 0b00: terminated, F_STREAM_DISABLED recorded.
        Terminate = 0,
        /// 0b01: stage 1 bypassed.
        Bypass = 1,
        /// 0b10: translated with CD 0 (and SubstreamID 0 is then not usable).
        Substream0 = 2,
    }
}

field_enum! {
    /// STE.EATS: ATS translation requests (§5.2).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub enum Eats {
        /// 0b00: ATS requests are aborted.
        Abort = 0,
        /// 0b01: full ATS: the SMMU returns the complete translation.
        Full = 1,
        /// 0b10: split-stage ATS: stage 1 only, stage 2 applied to translated traffic.
        SplitStage = 2,
    }
}

field_enum! {
    /// STE.STRW: the translation regime of stage 1 (§5.2).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub enum Strw {
        /// 0b00: Non-secure EL1 (ASID and VMID tagged).
        NsEl1 = 0,
        /// 0b10: EL2 (needs IDR0.Hyp).
        El2 = 2,
    }
}

field_enum! {
    /// A translation granule: STE.S2TG and CD.TG0 (§5.2, §5.4).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub enum Granule {
        /// 4 KiB.
        Size4K = 0,
        /// 64 KiB.
        Size64K = 1,
        /// 16 KiB.
        Size16K = 2,
    }
}

impl Granule {
    /// All granules, smallest first.
    pub const ALL: [Granule; 3] = [Granule::Size4K, Granule::Size16K, Granule::Size64K];

    /// The granule a CD.TG1 value names: its encoding differs from TG0's and S2TG's
    /// (0b01 16 KiB, 0b10 4 KiB, 0b11 64 KiB; 0b00 is reserved), as TCR_EL1.TG1's does
    /// (IHI 0070 §5.4).
    pub const fn from_tg1(bits: u64) -> Option<Granule> {
        match bits {
            0b01 => Some(Granule::Size16K),
            0b10 => Some(Granule::Size4K),
            0b11 => Some(Granule::Size64K),
            _ => None,
        }
    }

    /// The CD.TG1 encoding of the granule.
    pub const fn tg1(self) -> u64 {
        match self {
            Granule::Size16K => 0b01,
            Granule::Size4K => 0b10,
            Granule::Size64K => 0b11,
        }
    }

    /// log2 of the granule size: the page offset bits (12, 14 or 16).
    pub const fn shift(self) -> u32 {
        match self {
            Granule::Size4K => 12,
            Granule::Size16K => 14,
            Granule::Size64K => 16,
        }
    }

    /// The input bits one table resolves: a granule-sized table of 8-byte descriptors
    /// (9, 11 or 13; Arm ARM D8, "Translation table walk").
    pub const fn stride(self) -> u32 {
        self.shift() - 3
    }

    /// The lowest input-address bit a lookup at `level` (0 to 3) resolves.
    pub const fn level_shift(self, level: u8) -> u32 {
        self.shift() + self.stride() * (3 - level as u32)
    }

    /// The size of a level-3 page.
    pub const fn page_size(self) -> PageSize {
        match self {
            Granule::Size4K => PageSize::Size4K,
            Granule::Size16K => PageSize::Size16K,
            Granule::Size64K => PageSize::Size64K,
        }
    }

    /// The lookup level whose tables a walk of an `input_bits`-bit input starts at when
    /// the start table resolves at most one table's worth of bits (stage 1, Arm ARM D8,
    /// "initial lookup level").
    pub const fn start_level(self, input_bits: u32) -> u8 {
        let levels = (input_bits - self.shift()).div_ceil(self.stride());
        (4 - levels) as u8
    }
}

/// Why an STE is C_BAD_STE.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum BadSte {
    /// V = 0.
    #[error("STE not valid (V = 0)")]
    NotValid,
    /// A RES0 bit is set.
    #[error("reserved bits {bits:#x} set in STE word {word}")]
    ReservedBits {
        /// The word (0 to 7).
        word: usize,
        /// The RES0 bits set in it.
        bits: u64,
    },
    /// A field holds a reserved encoding.
    #[error("reserved encoding {value:#x} in STE.{field}")]
    ReservedEncoding {
        /// The field's spec name.
        field: &'static str,
        /// The value found.
        value: u64,
    },
    /// Config enables a stage the SMMU does not implement.
    #[error("STE.Config {0:?} needs a stage the SMMU does not implement")]
    StageNotImplemented(Config),
    /// S1CDMax is beyond IDR1.SSIDSIZE.
    #[error("S1CDMax {s1cdmax} is beyond SSIDSIZE {ssid_bits}")]
    S1CdMax {
        /// S1CDMax.
        s1cdmax: u8,
        /// IDR1.SSIDSIZE.
        ssid_bits: u8,
    },
    /// A 2-level CD table without IDR0.CD2L.
    #[error("2-level CD tables are not supported (IDR0.CD2L = 0)")]
    Cd2l,
    /// EATS enables ATS that the SMMU or the Config cannot give.
    #[error("STE.EATS {0:?} is not supported with this Config")]
    Eats(Eats),
    /// STRW = EL2 without IDR0.Hyp, or with stage 2.
    #[error("STE.STRW = EL2 is not supported here")]
    Strw,
    /// A VMID above 8 bits without IDR0.VMID16.
    #[error("VMID {0:#x} needs 16-bit VMIDs")]
    Vmid(u16),
    /// S2AA64 = 0: AArch32 stage-2 tables.
    #[error("AArch32 stage-2 tables are not supported")]
    S2AArch32,
    /// S2ENDI = 1: big-endian stage-2 tables.
    #[error("big-endian stage-2 tables are not supported")]
    S2BigEndian,
    /// S2TG names a granule the SMMU does not implement.
    #[error("stage-2 granule {0:?} is not supported")]
    S2Granule(Granule),
    /// S2T0SZ and S2SL0 do not describe a table.
    #[error(transparent)]
    S2Table(TableConfigError),
    /// S2TTB is beyond the effective S2PS.
    #[error("S2TTB {s2ttb:#x} is beyond the {bits}-bit stage-2 output size")]
    S2ttb {
        /// S2TTB.
        s2ttb: u64,
        /// The effective output size in bits.
        bits: u32,
    },
    /// S1STALLD or S2S contradicts IDR0.STALL_MODEL: S1STALLD = 1 with stage 1 under
    /// any model but stall-and-terminate, S2S = 1 under terminate-only, S2S = 0 under
    /// forced stall.
    #[error("stall setting not allowed by the stall model {0:?}")]
    Stall(StallModel),
}

/// A valid stream table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ste {
    /// Config.
    pub config: Config,
    /// S1Fmt.
    pub s1fmt: S1Fmt,
    /// S1ContextPtr: the CD table's address (bits 51:6; an IPA when stage 2 translates).
    pub s1_context_ptr: u64,
    /// S1CDMax: log2 of the number of CDs (0: one CD, substreams disabled).
    pub s1cdmax: u8,
    /// S1DSS.
    pub s1dss: S1Dss,
    /// S1CIR: inner cacheability of CD and stage-1 table accesses.
    pub s1cir: u8,
    /// S1COR: outer cacheability of CD and stage-1 table accesses.
    pub s1cor: u8,
    /// S1CSH: shareability of CD and stage-1 table accesses.
    pub s1csh: u8,
    /// S1STALLD: stage-1 stall disable.
    pub s1stalld: bool,
    /// EATS.
    pub eats: Eats,
    /// STRW.
    pub strw: Strw,
    /// Word 1's attribute override and hint fields, carried unchanged and not interpreted
    /// by vsva: S2HWU59-62, DRE, CONT, DCP, PPAR, MEV, MemAttr, MTCFG, ALLOCCFG, SHCFG,
    /// NSCFG, PRIVCFG, INSTCFG (at their word-1 bit positions).
    pub overrides: u64,
    /// S2VMID.
    pub s2vmid: u16,
    /// S2T0SZ.
    pub s2t0sz: u8,
    /// S2SL0.
    pub s2sl0: u8,
    /// S2IR0: inner cacheability of stage-2 table accesses.
    pub s2ir0: u8,
    /// S2OR0: outer cacheability of stage-2 table accesses.
    pub s2or0: u8,
    /// S2SH0: shareability of stage-2 table accesses.
    pub s2sh0: u8,
    /// S2TG.
    pub s2tg: Granule,
    /// S2PS.
    pub s2ps: AddressSize,
    /// S2AA64: AArch64 stage-2 tables.
    pub s2aa64: bool,
    /// S2ENDI: big-endian stage-2 tables.
    pub s2endi: bool,
    /// S2AFFD: stage-2 Access flag fault disable.
    pub s2affd: bool,
    /// S2PTW: protected table walk.
    pub s2ptw: bool,
    /// S2HD: stage-2 hardware dirty state update.
    pub s2hd: bool,
    /// S2HA: stage-2 hardware Access flag update.
    pub s2ha: bool,
    /// S2S: stall stage-2 faults.
    pub s2s: bool,
    /// S2R: record stage-2 faults.
    pub s2r: bool,
    /// S2TTB: the stage-2 table's address (bits 51:4).
    pub s2ttb: u64,
}

/// The RES0 bits of each word (with the IMPLEMENTATION DEFINED word-1 bits 63:52 and
/// word-2 bits 31:16, which are ignored).
const RES0: [u64; 8] = [
    bits(58, 52),
    bits(26, 20) | bits(43, 41),
    bits(63, 59),
    bits(3, 0) | bits(63, 52),
    u64::MAX,
    u64::MAX,
    u64::MAX,
    u64::MAX,
];

/// The word-1 bits of [`Ste::overrides`].
const OVERRIDES: u64 = bits(19, 8) | bits(40, 32) | bits(51, 44);

fn enumerated<T>(field: &'static str, value: u64, from: fn(u64) -> Option<T>) -> Result<T, BadSte> {
    from(value).ok_or(BadSte::ReservedEncoding { field, value })
}

impl Ste {
    /// An STE with `config` and every other field zero (linear CD table, S1DSS terminate,
    /// 4 KiB stage-2 granule, 32-bit S2PS, AArch64 stage-2 tables).
    pub const fn new(config: Config) -> Ste {
        Ste {
            config,
            s1fmt: S1Fmt::Linear,
            s1_context_ptr: 0,
            s1cdmax: 0,
            s1dss: S1Dss::Terminate,
            s1cir: 0,
            s1cor: 0,
            s1csh: 0,
            s1stalld: false,
            eats: Eats::Abort,
            strw: Strw::NsEl1,
            overrides: 0,
            s2vmid: 0,
            s2t0sz: 0,
            s2sl0: 0,
            s2ir0: 0,
            s2or0: 0,
            s2sh0: 0,
            s2tg: Granule::Size4K,
            s2ps: AddressSize::Bits32,
            s2aa64: true,
            s2endi: false,
            s2affd: false,
            s2ptw: false,
            s2hd: false,
            s2ha: false,
            s2s: false,
            s2r: false,
            s2ttb: 0,
        }
    }

    /// The eight words of the entry, with V set. Field values wider than their field are
    /// truncated to it.
    pub fn encode(&self) -> [u64; 8] {
        let flag = |b: bool, bit: u32| (b as u64) << bit;
        [
            1 | put(self.config.raw(), 3, 1)
                | put(self.s1fmt.raw(), 5, 4)
                | (self.s1_context_ptr & bits(51, 6))
                | put(self.s1cdmax as u64, 63, 59),
            put(self.s1dss.raw(), 1, 0)
                | put(self.s1cir as u64, 3, 2)
                | put(self.s1cor as u64, 5, 4)
                | put(self.s1csh as u64, 7, 6)
                | flag(self.s1stalld, 27)
                | put(self.eats.raw(), 29, 28)
                | put(self.strw.raw(), 31, 30)
                | (self.overrides & OVERRIDES),
            self.s2vmid as u64
                | put(self.s2t0sz as u64, 37, 32)
                | put(self.s2sl0 as u64, 39, 38)
                | put(self.s2ir0 as u64, 41, 40)
                | put(self.s2or0 as u64, 43, 42)
                | put(self.s2sh0 as u64, 45, 44)
                | put(self.s2tg.raw(), 47, 46)
                | put(self.s2ps.raw(), 50, 48)
                | flag(self.s2aa64, 51)
                | flag(self.s2endi, 52)
                | flag(self.s2affd, 53)
                | flag(self.s2ptw, 54)
                | flag(self.s2hd, 55)
                | flag(self.s2ha, 56)
                | flag(self.s2s, 57)
                | flag(self.s2r, 58),
            self.s2ttb & bits(51, 4),
            0,
            0,
            0,
            0,
        ]
    }

    /// Decodes the entry `raw` and checks it against `features`: the entry, or why it is
    /// C_BAD_STE.
    pub fn decode(raw: &[u64; 8], features: &Features) -> Result<Ste, BadSte> {
        if raw[0] & 1 == 0 {
            return Err(BadSte::NotValid);
        }
        for (word, (&w, &res0)) in raw.iter().zip(&RES0).enumerate() {
            if w & res0 != 0 {
                return Err(BadSte::ReservedBits {
                    word,
                    bits: w & res0,
                });
            }
        }
        let [w0, w1, w2, w3, ..] = *raw;
        let ste = Ste {
            config: enumerated("Config", get(w0, 3, 1), Config::from_bits)?,
            s1fmt: enumerated("S1Fmt", get(w0, 5, 4), S1Fmt::from_bits)?,
            s1_context_ptr: w0 & bits(51, 6),
            s1cdmax: get(w0, 63, 59) as u8,
            s1dss: enumerated("S1DSS", get(w1, 1, 0), S1Dss::from_bits)?,
            s1cir: get(w1, 3, 2) as u8,
            s1cor: get(w1, 5, 4) as u8,
            s1csh: get(w1, 7, 6) as u8,
            s1stalld: w1 & 1 << 27 != 0,
            eats: enumerated("EATS", get(w1, 29, 28), Eats::from_bits)?,
            strw: enumerated("STRW", get(w1, 31, 30), Strw::from_bits)?,
            overrides: w1 & OVERRIDES,
            s2vmid: get(w2, 15, 0) as u16,
            s2t0sz: get(w2, 37, 32) as u8,
            s2sl0: get(w2, 39, 38) as u8,
            s2ir0: get(w2, 41, 40) as u8,
            s2or0: get(w2, 43, 42) as u8,
            s2sh0: get(w2, 45, 44) as u8,
            s2tg: enumerated("S2TG", get(w2, 47, 46), Granule::from_bits)?,
            s2ps: enumerated("S2PS", get(w2, 50, 48), AddressSize::from_bits)?,
            s2aa64: w2 & 1 << 51 != 0,
            s2endi: w2 & 1 << 52 != 0,
            s2affd: w2 & 1 << 53 != 0,
            s2ptw: w2 & 1 << 54 != 0,
            s2hd: w2 & 1 << 55 != 0,
            s2ha: w2 & 1 << 56 != 0,
            s2s: w2 & 1 << 57 != 0,
            s2r: w2 & 1 << 58 != 0,
            s2ttb: w3 & bits(51, 4),
        };
        ste.check(features)?;
        Ok(ste)
    }

    /// The C_BAD_STE rules that depend on the Config and the SMMU's features.
    fn check(&self, f: &Features) -> Result<(), BadSte> {
        let c = self.config;
        if (c.stage1() && !f.s1p) || (c.stage2() && !f.s2p) {
            return Err(BadSte::StageNotImplemented(c));
        }
        if c.stage1() {
            if self.s1cdmax > f.ssid_bits {
                return Err(BadSte::S1CdMax {
                    s1cdmax: self.s1cdmax,
                    ssid_bits: f.ssid_bits,
                });
            }
            if self.s1cdmax != 0 && self.s1fmt != S1Fmt::Linear && !f.cd2l {
                return Err(BadSte::Cd2l);
            }
            if self.strw == Strw::El2 && (!f.hyp || c.stage2()) {
                return Err(BadSte::Strw);
            }
            // S1STALLD = 1 is ILLEGAL unless the SMMU lets streams choose (STALL_MODEL
            // 0b00): it cannot disable forced stalls (0b10), and an SMMU without stalls
            // (0b01) has no stall to disable (§5.2 S1STALLD; Linux sets it only with
            // ARM_SMMU_FEAT_STALLS for a master that cannot stall).
            if self.s1stalld && f.stall_model != StallModel::StallAndTerminate {
                return Err(BadSte::Stall(f.stall_model));
            }
        }
        let split_needs_nesting =
            self.eats == Eats::SplitStage && (c != Config::Nested || f.ns1ats);
        if self.eats != Eats::Abort && (!f.ats || split_needs_nesting) {
            return Err(BadSte::Eats(self.eats));
        }
        if c.stage2() {
            if !f.vmid16 && self.s2vmid > 0xff {
                return Err(BadSte::Vmid(self.s2vmid));
            }
            let stall_ok = match f.stall_model {
                StallModel::StallAndTerminate => true,
                StallModel::Terminate => !self.s2s,
                StallModel::ForceStall => self.s2s,
            };
            if !stall_ok {
                return Err(BadSte::Stall(f.stall_model));
            }
            self.s2_config(f)?;
        }
        Ok(())
    }

    /// The stage-2 table configuration: S2TTB, S2T0SZ, S2SL0, the effective S2PS (capped
    /// by OAS) and the S2HA/S2HD that IDR0.HTTU allows, S2AFFD, S2PTW.
    pub fn s2_config(&self, f: &Features) -> Result<S2Config, BadSte> {
        if !self.s2aa64 {
            return Err(BadSte::S2AArch32);
        }
        if self.s2endi {
            return Err(BadSte::S2BigEndian);
        }
        if !f.has_granule(self.s2tg) {
            return Err(BadSte::S2Granule(self.s2tg));
        }
        let (ha, hd) = f.hardware_updates(self.s2ha, self.s2hd);
        let flags = S2Flags {
            ha,
            hd,
            affd: self.s2affd,
            ptw: self.s2ptw,
        };
        let ps = f.cap_oas(self.s2ps);
        let cfg = S2Config::with_granule(
            self.s2ttb,
            self.s2t0sz,
            self.s2sl0,
            self.s2tg,
            ps,
            f.lpa(),
            flags,
        )
        .map_err(BadSte::S2Table)?;
        if self.s2ttb >> cfg.output_bits() != 0 {
            return Err(BadSte::S2ttb {
                s2ttb: self.s2ttb,
                bits: cfg.output_bits(),
            });
        }
        Ok(cfg)
    }
}

/// One line for `explain`: the Config and the fields it uses.
impl fmt::Display for Ste {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "STE Config={:?}", self.config)?;
        if self.config.stage1() {
            write!(
                f,
                " S1ContextPtr={:#x} S1Fmt={:?} S1CDMax={} S1DSS={:?} STRW={:?}",
                self.s1_context_ptr, self.s1fmt, self.s1cdmax, self.s1dss, self.strw
            )?;
        }
        if self.config.stage2() {
            write!(
                f,
                " VMID={:#x} S2TTB={:#x} S2T0SZ={} S2SL0={} S2PS={}b S2AFFD={} S2HA={} S2HD={} S2PTW={}",
                self.s2vmid,
                self.s2ttb,
                self.s2t0sz,
                self.s2sl0,
                self.s2ps.bits(),
                self.s2affd as u8,
                self.s2ha as u8,
                self.s2hd as u8,
                self.s2ptw as u8
            )?;
        }
        if self.eats != Eats::Abort {
            write!(f, " EATS={:?}", self.eats)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::Httu;
    use crate::testutil::count_hits;
    use proptest::prelude::*;

    /// A nested STE as a hypervisor writes it for a guest-owned CD table.
    fn nested() -> Ste {
        Ste {
            s1_context_ptr: 0x1234_5640,
            s1cdmax: 5,
            s1dss: S1Dss::Substream0,
            s1cir: 1,
            s1cor: 1,
            s1csh: 3,
            s2vmid: 0x42,
            s2t0sz: 24,
            s2sl0: 1,
            s2ir0: 1,
            s2or0: 1,
            s2sh0: 3,
            s2ps: AddressSize::Bits48,
            s2r: true,
            s2ttb: 0x8_0000,
            ..Ste::new(Config::Nested)
        }
    }

    #[test]
    fn hand_computed_encoding() {
        let raw = nested().encode();
        assert_eq!(
            raw,
            [
                0x2800_0000_1234_564f,
                0xd6,
                0x040d_3558_0000_0042,
                0x8_0000,
                0,
                0,
                0,
                0
            ]
        );
        assert_eq!(Ste::decode(&raw, &Features::VSVA), Ok(nested()));
        assert_eq!(
            nested().to_string(),
            "STE Config=Nested S1ContextPtr=0x12345640 S1Fmt=Linear S1CDMax=5 \
             S1DSS=Substream0 STRW=NsEl1 VMID=0x42 S2TTB=0x80000 S2T0SZ=24 S2SL0=1 S2PS=48b \
             S2AFFD=0 S2HA=0 S2HD=0 S2PTW=0"
        );
        assert_eq!(Ste::new(Config::Bypass).to_string(), "STE Config=Bypass");
        let s2 = nested().s2_config(&Features::VSVA).unwrap();
        assert_eq!(
            (s2.root(), s2.start_level(), s2.output_bits()),
            (0x8_0000, 1, 48)
        );
        // Every Config value.
        for (config, bits) in [
            (Config::Abort, 0b000),
            (Config::Bypass, 0b100),
            (Config::S1Trans, 0b101),
            (Config::S2Trans, 0b110),
            (Config::Nested, 0b111),
        ] {
            assert_eq!(Ste::new(config).encode()[0] & 0xf, bits << 1 | 1);
        }
    }

    #[test]
    fn bad_ste_rules() {
        let f = Features::VSVA;
        let word = |i: usize, set: u64| {
            let mut raw = nested().encode();
            raw[i] |= set;
            Ste::decode(&raw, &f)
        };
        assert_eq!(Ste::decode(&[0; 8], &f), Err(BadSte::NotValid));
        assert_eq!(
            word(0, 1 << 52),
            Err(BadSte::ReservedBits {
                word: 0,
                bits: 1 << 52
            })
        );
        assert_eq!(
            word(3, 1 << 60),
            Err(BadSte::ReservedBits {
                word: 3,
                bits: 1 << 60
            })
        );
        assert_eq!(word(5, 1), Err(BadSte::ReservedBits { word: 5, bits: 1 }));
        // IMPLEMENTATION DEFINED bits are ignored.
        assert!(word(1, 1 << 60).is_ok());
        let mut raw = nested().encode();
        raw[0] = (raw[0] & !0xe) | 0b010 << 1;
        assert_eq!(
            Ste::decode(&raw, &f),
            Err(BadSte::ReservedEncoding {
                field: "Config",
                value: 0b010
            })
        );
        assert_eq!(
            word(0, 3 << 4),
            Err(BadSte::ReservedEncoding {
                field: "S1Fmt",
                value: 3
            })
        );
        assert_eq!(
            word(1, 3),
            Err(BadSte::ReservedEncoding {
                field: "S1DSS",
                value: 3
            })
        );
        assert_eq!(
            word(1, 1 << 30),
            Err(BadSte::ReservedEncoding {
                field: "STRW",
                value: 1
            })
        );
        assert_eq!(
            word(2, 7 << 48),
            Err(BadSte::ReservedEncoding {
                field: "S2PS",
                value: 7
            })
        );
        let check = |ste: Ste, f: &Features| Ste::decode(&ste.encode(), f);
        let no_s1 = Features { s1p: false, ..f };
        assert_eq!(
            check(nested(), &no_s1),
            Err(BadSte::StageNotImplemented(Config::Nested))
        );
        assert!(
            check(Ste::new(Config::S2Trans), &no_s1).is_err(),
            "S2T0SZ 0 is no table"
        );
        let no_s2 = Features { s2p: false, ..f };
        assert_eq!(
            check(Ste::new(Config::S2Trans), &no_s2),
            Err(BadSte::StageNotImplemented(Config::S2Trans))
        );
        assert_eq!(
            check(
                Ste {
                    s1cdmax: 21,
                    ..nested()
                },
                &f
            ),
            Err(BadSte::S1CdMax {
                s1cdmax: 21,
                ssid_bits: 20
            })
        );
        let two_level = Ste {
            s1fmt: S1Fmt::TwoLevel64K,
            ..nested()
        };
        assert!(check(two_level, &f).is_ok());
        assert_eq!(
            check(two_level, &Features { cd2l: false, ..f }),
            Err(BadSte::Cd2l)
        );
        // S1Fmt is ignored when S1CDMax is 0.
        assert!(check(
            Ste {
                s1cdmax: 0,
                ..two_level
            },
            &Features { cd2l: false, ..f }
        )
        .is_ok());
        assert!(check(
            Ste {
                eats: Eats::Full,
                ..nested()
            },
            &f
        )
        .is_ok());
        assert_eq!(
            check(
                Ste {
                    eats: Eats::Full,
                    ..nested()
                },
                &Features { ats: false, ..f }
            ),
            Err(BadSte::Eats(Eats::Full))
        );
        assert!(check(
            Ste {
                eats: Eats::SplitStage,
                ..nested()
            },
            &f
        )
        .is_ok());
        let s1_only = Ste {
            config: Config::S1Trans,
            ..nested()
        };
        assert_eq!(
            check(
                Ste {
                    eats: Eats::SplitStage,
                    ..s1_only
                },
                &f
            ),
            Err(BadSte::Eats(Eats::SplitStage))
        );
        assert_eq!(
            check(
                Ste {
                    strw: Strw::El2,
                    ..s1_only
                },
                &f
            ),
            Err(BadSte::Strw)
        );
        assert!(check(
            Ste {
                strw: Strw::El2,
                ..s1_only
            },
            &Features { hyp: true, ..f }
        )
        .is_ok());
        assert_eq!(
            check(
                Ste {
                    s2vmid: 0x100,
                    ..nested()
                },
                &Features { vmid16: false, ..f }
            ),
            Err(BadSte::Vmid(0x100))
        );
        assert_eq!(
            check(
                Ste {
                    s2aa64: false,
                    ..nested()
                },
                &f
            ),
            Err(BadSte::S2AArch32)
        );
        assert_eq!(
            check(
                Ste {
                    s2endi: true,
                    ..nested()
                },
                &f
            ),
            Err(BadSte::S2BigEndian)
        );
        assert_eq!(
            check(
                Ste {
                    s2tg: Granule::Size64K,
                    ..nested()
                },
                &Features {
                    gran64k: false,
                    ..f
                }
            ),
            Err(BadSte::S2Granule(Granule::Size64K))
        );
        // With IDR5.GRAN64K the same STE is valid: S2SL0 1 starts at level 2 with 64 KiB,
        // where a 40-bit IPA takes 11 bits (one table), a 46-bit IPA 17 bits (16 tables).
        let s2_64k = Ste {
            s2tg: Granule::Size64K,
            ..nested()
        };
        assert_eq!(check(s2_64k, &f), Ok(s2_64k));
        let cfg = s2_64k.s2_config(&f).unwrap();
        assert_eq!((cfg.start_level(), cfg.concatenated_tables()), (2, 1));
        let wide = Ste {
            s2t0sz: 18,
            ..s2_64k
        };
        let cfg = wide.s2_config(&f).unwrap();
        assert_eq!((cfg.start_level(), cfg.concatenated_tables()), (2, 16));
        assert_eq!(
            check(
                Ste {
                    s2sl0: 0,
                    ..nested()
                },
                &f
            ),
            Err(BadSte::S2Table(TableConfigError::S2sl0 {
                s2sl0: 0,
                s2t0sz: 24
            }))
        );
        assert_eq!(
            check(
                Ste {
                    s2ps: AddressSize::Bits32,
                    s2ttb: 1 << 32,
                    ..nested()
                },
                &f
            ),
            Err(BadSte::S2ttb {
                s2ttb: 1 << 32,
                bits: 32
            })
        );
        // S2PS beyond OAS is capped, not refused.
        let small_oas = Features {
            oas: AddressSize::Bits40,
            ..f
        };
        let s2 = nested().s2_config(&small_oas).unwrap();
        assert_eq!(s2.output_bits(), 40);
        assert_eq!(
            check(
                Ste {
                    s2s: true,
                    ..nested()
                },
                &f
            ),
            Err(BadSte::Stall(StallModel::Terminate))
        );
        let forced = Features {
            stall_model: StallModel::ForceStall,
            ..f
        };
        assert_eq!(
            check(nested(), &forced),
            Err(BadSte::Stall(StallModel::ForceStall))
        );
        assert_eq!(
            check(
                Ste {
                    s2s: true,
                    s1stalld: true,
                    ..nested()
                },
                &forced
            ),
            Err(BadSte::Stall(StallModel::ForceStall))
        );
        // S1STALLD under terminate-only (0b01): ILLEGAL for a stage-1 Config, whether
        // stage 2 translates or not; ignored when stage 1 does not translate.
        let stalld = |ste: Ste| Ste {
            s1stalld: true,
            ..ste
        };
        for ste in [nested(), s1_only] {
            assert_eq!(
                check(stalld(ste), &f),
                Err(BadSte::Stall(StallModel::Terminate))
            );
        }
        let s2_only = Ste {
            config: Config::S2Trans,
            ..nested()
        };
        assert!(check(stalld(s2_only), &f).is_ok());
        // Under stall-and-terminate (0b00) a stream may disable stage-1 stalls.
        let choose = Features {
            stall_model: StallModel::StallAndTerminate,
            ..f
        };
        for ste in [nested(), s1_only] {
            assert_eq!(check(stalld(ste), &choose), Ok(stalld(ste)));
        }
        // S2 fields are ignored unless stage 2 translates.
        assert!(check(
            Ste {
                s2aa64: false,
                ..s1_only
            },
            &f
        )
        .is_ok());
        // HA/HD only as far as HTTU allows.
        let hw = Ste {
            s2ha: true,
            s2hd: true,
            ..nested()
        };
        assert_eq!(
            hw.s2_config(&f).unwrap().flags(),
            crate::walk::S2Flags {
                ha: true,
                hd: true,
                ..Default::default()
            }
        );
        let a_only = Features {
            httu: Httu::Access,
            ..f
        };
        assert_eq!(
            hw.s2_config(&a_only).unwrap().flags(),
            crate::walk::S2Flags {
                ha: true,
                ..Default::default()
            }
        );
    }

    /// Whatever the words, decoding never panics, and a decoded entry encodes back to the
    /// same words apart from the IMPLEMENTATION DEFINED bits.
    #[test]
    fn decode_encode_round_trip() {
        let words = (
            prop::array::uniform4(any::<u64>()),
            prop::array::uniform4(any::<u64>()),
        );
        let hits = count_hits(512, &words, |(w, mask)| {
            let mut raw = [0u64; 8];
            for i in 0..4 {
                // Sparse words reach valid entries more often.
                raw[i] = w[i] & mask[i] & !RES0[i];
            }
            raw[0] |= 1;
            let Ok(ste) = Ste::decode(&raw, &Features::VSVA) else {
                return Ok(false);
            };
            let mut expected = raw;
            expected[1] &= !bits(63, 52);
            expected[2] &= !bits(31, 16);
            prop_assert_eq!(ste.encode(), expected);
            Ok(true)
        });
        println!("STE round trip: {hits} of 512 decoded");
        assert!(hits >= 50, "only {hits} of 512 random entries decoded");
    }
}
