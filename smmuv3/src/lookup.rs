//! Finding a transaction's configuration (IHI 0070 §3.3): its STE in the stream
//! table (linear or 2-level) by StreamID, then its CD in the STE's CD
//! table (linear or 2-level) by SubstreamID, with the configuration errors each
//! step can raise (§7.3: C_BAD_STREAMID, F_STE_FETCH, C_BAD_STE, F_STREAM_DISABLED,
//! C_BAD_SUBSTREAMID, F_CD_FETCH, C_BAD_CD).
//!
//! When stage 2 translates, S1ContextPtr and the L1CD pointers are IPAs: each CD table
//! access is a stage-2 read, whose faults have CLASS CD.

use crate::cd::{BadCd, ContextDescriptor, L1Cd};
use crate::features::Features;
use crate::field::{bits, get};
use crate::ste::{BadSte, S1Dss, Ste};
use crate::walk::stage2::S2Start;
use crate::walk::{S1Config, S2Config, WalkFault, WalkObserver};
use vsva_mem::PhysMem;

/// A configuration error found while looking up a transaction's STE or CD.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum ConfigFault {
    /// C_BAD_STREAMID: the StreamID is beyond the stream table, or its L1STD is invalid.
    #[error("C_BAD_STREAMID")]
    BadStreamId,
    /// F_STE_FETCH: the STE (or L1STD) at this address could not be read.
    #[error("F_STE_FETCH at {addr:#x}")]
    SteFetch {
        /// The physical address of the failed read.
        addr: u64,
    },
    /// C_BAD_STE.
    #[error("C_BAD_STE: {0}")]
    BadSte(BadSte),
    /// F_STREAM_DISABLED: a transaction without SubstreamID while S1DSS terminates them.
    #[error("F_STREAM_DISABLED")]
    StreamDisabled,
    /// C_BAD_SUBSTREAMID: the SubstreamID is not allowed or beyond the CD table, or its
    /// L1CD is invalid.
    #[error("C_BAD_SUBSTREAMID")]
    BadSubstreamId,
    /// F_CD_FETCH: the CD (or L1CD) at this physical address could not be read.
    #[error("F_CD_FETCH at {addr:#x}")]
    CdFetch {
        /// The physical address of the failed read.
        addr: u64,
    },
    /// C_BAD_CD.
    #[error("C_BAD_CD: {0}")]
    BadCd(BadCd),
    /// Stage 2 refused a CD table access (CLASS CD).
    #[error("stage-2 fault fetching the CD: {0}")]
    Stage2(WalkFault),
}

impl ConfigFault {
    /// The event type the SMMU records (§7.3).
    pub const fn event_type(&self) -> u8 {
        match self {
            ConfigFault::BadStreamId => 0x02,
            ConfigFault::SteFetch { .. } => 0x03,
            ConfigFault::BadSte(_) => 0x04,
            ConfigFault::StreamDisabled => 0x06,
            ConfigFault::BadSubstreamId => 0x08,
            ConfigFault::CdFetch { .. } => 0x09,
            ConfigFault::BadCd(_) => 0x0a,
            ConfigFault::Stage2(f) => f.kind.raw() as u8,
        }
    }
}

/// A level-1 stream table descriptor (§5.1, L1STD): Span and L2Ptr.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct L1Std(pub u64);

impl L1Std {
    /// L2Ptr: the level-2 table's address, bits 51:6.
    pub const L2PTR: u64 = bits(51, 6);

    /// A descriptor for the level-2 table at `l2ptr` holding 2^(span - 1) STEs (span 0:
    /// invalid).
    pub const fn new(l2ptr: u64, span: u8) -> Self {
        L1Std((l2ptr & Self::L2PTR) | (span as u64 & 0x1f))
    }

    /// Span.
    pub const fn span(self) -> u8 {
        get(self.0, 4, 0) as u8
    }

    /// L2Ptr.
    pub const fn l2ptr(self) -> u64 {
        self.0 & Self::L2PTR
    }
}

/// A stream table as SMMU_STRTAB_BASE and SMMU_STRTAB_BASE_CFG describe it
/// (§6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StreamTable {
    base: u64,
    log2size: u8,
    split: Option<u8>,
}

/// A stream table configuration vsva cannot use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum BadStreamTable {
    /// STRTAB_BASE_CFG.FMT is reserved (2 or 3).
    #[error("STRTAB_BASE_CFG.FMT {0} is reserved")]
    Format(u8),
    /// STRTAB_BASE_CFG.SPLIT of a 2-level table is not 6, 8 or 10.
    #[error("STRTAB_BASE_CFG.SPLIT {0} is not 6, 8 or 10")]
    Split(u8),
}

impl StreamTable {
    /// The table at `base` (bits 51:6) with 2^`log2size` StreamIDs (capped by
    /// IDR1.SIDSIZE), linear (`split` `None`) or 2-level with level-2 tables covering
    /// `split` StreamID bits (6, 8 or 10).
    pub fn new(
        base: u64,
        log2size: u8,
        split: Option<u8>,
        f: &Features,
    ) -> Result<Self, BadStreamTable> {
        if let Some(s) = split.filter(|s| ![6, 8, 10].contains(s)) {
            return Err(BadStreamTable::Split(s));
        }
        Ok(StreamTable {
            base: base & bits(51, 6),
            log2size: log2size.min(f.sid_bits).min(32),
            split,
        })
    }

    /// The address of the STE of `sid`, reading the L1STD of a 2-level table.
    pub fn ste_address<M: PhysMem + ?Sized>(&self, mem: &M, sid: u32) -> Result<u64, ConfigFault> {
        if (sid as u64) >> self.log2size != 0 {
            return Err(ConfigFault::BadStreamId);
        }
        let Some(split) = self.split else {
            return Ok(self.base + sid as u64 * 64);
        };
        let addr = self.base + (sid as u64 >> split) * 8;
        let l1 = L1Std(
            mem.read_u64(addr)
                .map_err(|_| ConfigFault::SteFetch { addr })?,
        );
        let span = l1.span();
        // Span 0 is invalid, and a span beyond SPLIT + 1 (or with RES0 bits set) is
        // treated as invalid too.
        if span == 0 || span > split + 1 || l1.0 & !(L1Std::L2PTR | 0x1f) != 0 {
            return Err(ConfigFault::BadStreamId);
        }
        let index = sid as u64 & ((1 << split) - 1);
        if index >> (span - 1) != 0 {
            return Err(ConfigFault::BadStreamId);
        }
        Ok(l1.l2ptr() + index * 64)
    }

    /// The STE of `sid`, checked against `f`.
    pub fn find_ste<M: PhysMem + ?Sized>(
        &self,
        mem: &M,
        f: &Features,
        sid: u32,
    ) -> Result<Ste, ConfigFault> {
        let addr = self.ste_address(mem, sid)?;
        let raw = read_64_bytes(mem, addr).ok_or(ConfigFault::SteFetch { addr })?;
        Ste::decode(&raw, f).map_err(ConfigFault::BadSte)
    }
}

fn read_64_bytes<M: PhysMem + ?Sized>(mem: &M, addr: u64) -> Option<[u64; 8]> {
    let mut raw = [0; 8];
    for (i, w) in raw.iter_mut().enumerate() {
        *w = mem.read_u64(addr.checked_add(i as u64 * 8)?).ok()?;
    }
    Some(raw)
}

/// Stage 1 of a transaction, from its STE and SubstreamID.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage1Context {
    /// S1DSS = bypass for a transaction without SubstreamID: stage 1 does not translate.
    Bypass,
    /// The CD at `index` of the CD table, and its stage-1 configuration.
    Cd {
        /// The CD's index (the SubstreamID, or 0).
        index: u32,
        /// The physical address the CD was read from.
        address: u64,
        /// The CD.
        cd: ContextDescriptor,
        /// Its TTB0 configuration.
        s1: S1Config,
    },
}

/// The stage-1 context of a transaction with SubstreamID `ssid` (`None` without SSV) on a
/// stream whose STE `ste` enables stage 1; `s2` is the STE's stage 2 when it translates
/// (CD table addresses are then IPAs, and `obs` sees each of their stage-2 walks from
/// S2TTB). `input` is the transaction's address, for stage-2 fault records.
pub fn find_cd<M, O>(
    mem: &M,
    ste: &Ste,
    f: &Features,
    ssid: Option<u32>,
    s2: Option<&S2Config>,
    input: u64,
    obs: &mut O,
) -> Result<Stage1Context, ConfigFault>
where
    M: PhysMem + ?Sized,
    O: WalkObserver + ?Sized,
{
    let mut to_pa = |addr: u64| -> Result<u64, ConfigFault> {
        match s2 {
            None => Ok(addr),
            Some(s2) => {
                let stage = crate::walk::NestedStage { mem, s2 };
                stage
                    .cd_fetch_from(S2Start::top(s2), addr, input, obs)
                    .map(|t| t.output)
                    .map_err(ConfigFault::Stage2)
            }
        }
    };
    find_cd_with(mem, ste, f, ssid, &mut to_pa)
}

/// [`find_cd`] with the physical address of each L1CD and CD fetch given by `to_pa` (the
/// identity without stage 2; with it, a stage-2 walk that may start from a walk cache,
/// CLASS CD, as [`NestedStage::cd_fetch_from`](crate::walk::NestedStage::cd_fetch_from) walks).
pub fn find_cd_with<M>(
    mem: &M,
    ste: &Ste,
    f: &Features,
    ssid: Option<u32>,
    to_pa: &mut dyn FnMut(u64) -> Result<u64, ConfigFault>,
) -> Result<Stage1Context, ConfigFault>
where
    M: PhysMem + ?Sized,
{
    let index = match (ste.s1cdmax, ssid) {
        (0, Some(_)) => return Err(ConfigFault::BadSubstreamId),
        (0, None) => 0,
        (max, Some(s)) => {
            // S1DSS only governs transactions without a SubstreamID: SubstreamID 0 selects
            // CD 0 like any other.
            if (s as u64) >> max != 0 {
                return Err(ConfigFault::BadSubstreamId);
            }
            s
        }
        (_, None) => match ste.s1dss {
            S1Dss::Terminate => return Err(ConfigFault::StreamDisabled),
            S1Dss::Bypass => return Ok(Stage1Context::Bypass),
            S1Dss::Substream0 => 0,
        },
    };
    let cd_addr = match ste.s1fmt.split().filter(|_| ste.s1cdmax != 0) {
        None => ste.s1_context_ptr + index as u64 * 64,
        Some(split) => {
            let l1_addr = to_pa(ste.s1_context_ptr + (index as u64 >> split) * 8)?;
            let l1 = mem
                .read_u64(l1_addr)
                .map_err(|_| ConfigFault::CdFetch { addr: l1_addr })?;
            let l2 = L1Cd(l1).l2ptr().ok_or(ConfigFault::BadSubstreamId)?;
            l2 + (index as u64 & ((1 << split) - 1)) * 64
        }
    };
    let pa = to_pa(cd_addr)?;
    let raw = read_64_bytes(mem, pa).ok_or(ConfigFault::CdFetch { addr: pa })?;
    let cd = ContextDescriptor::decode(&raw, f).map_err(ConfigFault::BadCd)?;
    let s1 = cd.s1_config(f).map_err(ConfigFault::BadCd)?;
    Ok(Stage1Context::Cd {
        index,
        address: pa,
        cd,
        s1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builder::TableBuilder;
    use crate::desc::Descriptor as D;
    use crate::ste::{Config, S1Fmt};
    use crate::testutil::TestMemory;
    use crate::walk::{
        AddressSize, FaultClass, FaultKind, FaultStage, PageSize, S2Flags, WalkRecord,
    };

    const F: Features = Features::VSVA;

    fn write(mem: &TestMemory, addr: u64, words: &[u64; 8]) {
        for (i, w) in words.iter().enumerate() {
            mem.write_u64(addr + i as u64 * 8, *w).unwrap();
        }
    }

    fn s1_ste(ctx: u64, s1cdmax: u8, s1fmt: S1Fmt, s1dss: S1Dss) -> Ste {
        Ste {
            s1_context_ptr: ctx,
            s1cdmax,
            s1fmt,
            s1dss,
            ..Ste::new(Config::S1Trans)
        }
    }

    #[test]
    fn linear_stream_table() {
        let mem = TestMemory::new(1 << 20);
        let table = StreamTable::new(0x1_0000, 8, None, &F).unwrap();
        let ste = s1_ste(0x8000, 0, S1Fmt::Linear, S1Dss::Terminate);
        write(&mem, 0x1_0000 + 5 * 64, &ste.encode());
        assert_eq!(table.find_ste(&mem, &F, 5), Ok(ste));
        assert_eq!(table.ste_address(&mem, 255), Ok(0x1_0000 + 255 * 64));
        assert_eq!(table.find_ste(&mem, &F, 256), Err(ConfigFault::BadStreamId));
        assert_eq!(
            table.find_ste(&mem, &F, u32::MAX),
            Err(ConfigFault::BadStreamId)
        );
        // An invalid STE.
        assert_eq!(
            table.find_ste(&mem, &F, 6),
            Err(ConfigFault::BadSte(BadSte::NotValid))
        );
        // LOG2SIZE is capped by SIDSIZE.
        let capped = StreamTable::new(0x1_0000, 40, None, &Features { sid_bits: 4, ..F }).unwrap();
        assert_eq!(capped.ste_address(&mem, 16), Err(ConfigFault::BadStreamId));
        // An STE beyond memory is F_STE_FETCH.
        let far = StreamTable::new(0xf_ff00, 8, None, &F).unwrap();
        assert_eq!(
            far.find_ste(&mem, &F, 4),
            Err(ConfigFault::SteFetch { addr: 0x10_0000 })
        );
        assert_eq!(
            StreamTable::new(0, 8, Some(7), &F),
            Err(BadStreamTable::Split(7))
        );
    }

    #[test]
    fn two_level_stream_table() {
        let mem = TestMemory::new(1 << 20);
        // 16-bit StreamIDs, split 8: 256 L1STDs at 0x1000.
        let table = StreamTable::new(0x1000, 16, Some(8), &F).unwrap();
        // L1 entry 0x12 -> 16 STEs (span 5) at 0x4_0000.
        mem.write_u64(0x1000 + 0x12 * 8, L1Std::new(0x4_0000, 5).0)
            .unwrap();
        let ste = Ste::new(Config::Bypass);
        write(&mem, 0x4_0000 + 0xf * 64, &ste.encode());
        assert_eq!(table.find_ste(&mem, &F, 0x120f), Ok(ste));
        // Beyond the span, in an L1 entry with span 0, or with span > SPLIT + 1.
        assert_eq!(
            table.find_ste(&mem, &F, 0x1210),
            Err(ConfigFault::BadStreamId)
        );
        assert_eq!(
            table.find_ste(&mem, &F, 0x1300),
            Err(ConfigFault::BadStreamId)
        );
        mem.write_u64(0x1000 + 0x13 * 8, L1Std::new(0x5_0000, 10).0)
            .unwrap();
        assert_eq!(
            table.find_ste(&mem, &F, 0x1300),
            Err(ConfigFault::BadStreamId)
        );
        // A full level-2 table (span 9 = SPLIT + 1).
        mem.write_u64(0x1000 + 0x13 * 8, L1Std::new(0x5_0000, 9).0)
            .unwrap();
        assert_eq!(table.ste_address(&mem, 0x13ff), Ok(0x5_0000 + 0xff * 64));
        // An L1STD outside memory is F_STE_FETCH at its address.
        let far = StreamTable::new(0xf_ff00, 16, Some(6), &F).unwrap();
        assert_eq!(
            far.find_ste(&mem, &F, 0x40 * 0x20),
            Err(ConfigFault::SteFetch {
                addr: 0xf_ff00 + 0x20 * 8
            })
        );
    }

    #[test]
    fn linear_cd_table_and_substreams() {
        let mem = TestMemory::new(1 << 20);
        let cd = ContextDescriptor::new(0x9000, 16, 7);
        write(&mem, 0x8000 + 3 * 64, &cd.encode());
        write(
            &mem,
            0x8000,
            &ContextDescriptor::new(0xa000, 25, 8).encode(),
        );
        let ste = s1_ste(0x8000, 4, S1Fmt::Linear, S1Dss::Terminate);
        match find_cd(&mem, &ste, &F, Some(3), None, 0, &mut ()).unwrap() {
            Stage1Context::Cd {
                index,
                address,
                cd: got,
                s1,
            } => {
                assert_eq!((index, address, got), (3, 0x8000 + 3 * 64, cd));
                assert_eq!(s1.root(), 0x9000);
            }
            other => panic!("{other:?}"),
        }
        // SubstreamIDs beyond S1CDMax, and an invalid CD.
        assert_eq!(
            find_cd(&mem, &ste, &F, Some(16), None, 0, &mut ()),
            Err(ConfigFault::BadSubstreamId)
        );
        assert_eq!(
            find_cd(&mem, &ste, &F, Some(4), None, 0, &mut ()),
            Err(ConfigFault::BadCd(BadCd::NotValid))
        );
        // Without a SubstreamID: S1DSS decides.
        assert_eq!(
            find_cd(&mem, &ste, &F, None, None, 0, &mut ()),
            Err(ConfigFault::StreamDisabled)
        );
        let bypass = Ste {
            s1dss: S1Dss::Bypass,
            ..ste
        };
        assert_eq!(
            find_cd(&mem, &bypass, &F, None, None, 0, &mut ()),
            Ok(Stage1Context::Bypass)
        );
        let ssid0 = Ste {
            s1dss: S1Dss::Substream0,
            ..ste
        };
        assert!(matches!(
            find_cd(&mem, &ssid0, &F, None, None, 0, &mut ()),
            Ok(Stage1Context::Cd { index: 0, .. })
        ));
        // With a SubstreamID, 0 is CD 0 as well (S1DSS does not apply).
        assert!(matches!(
            find_cd(&mem, &ssid0, &F, Some(0), None, 0, &mut ()),
            Ok(Stage1Context::Cd { index: 0, .. })
        ));
        // S1CDMax 0: one CD, no substreams (S1DSS ignored).
        let single = s1_ste(0x8000, 0, S1Fmt::TwoLevel4K, S1Dss::Terminate);
        assert!(matches!(
            find_cd(&mem, &single, &F, None, None, 0, &mut ()),
            Ok(Stage1Context::Cd { index: 0, .. })
        ));
        assert_eq!(
            find_cd(&mem, &single, &F, Some(0), None, 0, &mut ()),
            Err(ConfigFault::BadSubstreamId)
        );
        // A CD beyond memory.
        let far = s1_ste(0xf_ffc0, 4, S1Fmt::Linear, S1Dss::Terminate);
        assert_eq!(
            find_cd(&mem, &far, &F, Some(1), None, 0, &mut ()),
            Err(ConfigFault::CdFetch { addr: 0x10_0000 })
        );
    }

    #[test]
    fn two_level_cd_table() {
        let mem = TestMemory::new(1 << 20);
        // S1CDMax 10, 4 KiB leaves of 64 CDs: SubstreamID 0x2c5 is L1 entry 0xb, CD 5.
        let ste = s1_ste(0x2000, 10, S1Fmt::TwoLevel4K, S1Dss::Terminate);
        mem.write_u64(0x2000 + 0xb * 8, L1Cd::new(0x3_0000).0)
            .unwrap();
        let cd = ContextDescriptor::new(0x9000, 20, 9);
        write(&mem, 0x3_0000 + 5 * 64, &cd.encode());
        assert!(matches!(
            find_cd(&mem, &ste, &F, Some(0x2c5), None, 0, &mut ()),
            Ok(Stage1Context::Cd { index: 0x2c5, cd: got, .. }) if got == cd
        ));
        // An invalid L1CD.
        assert_eq!(
            find_cd(&mem, &ste, &F, Some(0x305), None, 0, &mut ()),
            Err(ConfigFault::BadSubstreamId)
        );
        // 64 KiB leaves: 1024 CDs each; SubstreamID 0x805 is L1 entry 2, CD 5.
        let big = s1_ste(0x2000, 12, S1Fmt::TwoLevel64K, S1Dss::Terminate);
        mem.write_u64(0x2000 + 2 * 8, L1Cd::new(0x4_0000).0)
            .unwrap();
        write(&mem, 0x4_0000 + 5 * 64, &cd.encode());
        assert!(matches!(
            find_cd(&mem, &big, &F, Some(0x805), None, 0, &mut ()),
            Ok(Stage1Context::Cd { .. })
        ));
    }

    #[test]
    fn nested_cd_fetch_goes_through_stage2() {
        let mem = TestMemory::new(1 << 20);
        // Stage 2 maps IPA 0x4000_0000 (2 MiB, read-only) to PA 0, so the guest's CD
        // table at IPA 0x4000_8000 is at PA 0x8000.
        let s2 = S2Config::new(0x1_0000, 25, 1, AddressSize::Bits48, S2Flags::default()).unwrap();
        let mut b = TableBuilder::stage2(&s2);
        let mut next = 0x2_0000;
        let mut alloc = || {
            next += 0x1000;
            Some(next - 0x1000)
        };
        b.map(
            &mem,
            &mut alloc,
            0x4000_0000,
            0,
            PageSize::Size2M,
            D::AF | D::S2AP_R,
        )
        .unwrap();
        let cd = ContextDescriptor::new(0x4010_0000, 16, 3);
        write(&mem, 0x8000 + 64, &cd.encode());
        let ste = Ste {
            config: Config::Nested,
            ..s1_ste(0x4000_8000, 2, S1Fmt::Linear, S1Dss::Terminate)
        };
        let mut rec = WalkRecord::default();
        assert!(matches!(
            find_cd(&mem, &ste, &F, Some(1), Some(&s2), 0x77, &mut rec),
            Ok(Stage1Context::Cd { cd: got, address: 0x8040, .. }) if got == cd
        ));
        // The CD's IPA went through stage 2: level 1, then the 2 MiB block at level 2.
        let walked: Vec<(u8, u64)> = rec.steps.iter().map(|s| (s.level, s.input)).collect();
        assert_eq!(walked, [(1, 0x4000_8040), (2, 0x4000_8040)]);
        // A CD table IPA stage 2 does not map: a stage-2 Translation fault of CLASS CD.
        let unmapped = Ste {
            s1_context_ptr: 0x5000_0000,
            ..ste
        };
        let Err(ConfigFault::Stage2(f)) =
            find_cd(&mem, &unmapped, &F, Some(1), Some(&s2), 0x77, &mut ())
        else {
            panic!("expected a stage-2 fault");
        };
        assert_eq!(
            (f.kind, f.stage, f.input),
            (
                FaultKind::Translation,
                FaultStage::Stage2 {
                    class: FaultClass::Cd,
                    ipa: 0x5000_0040
                },
                0x77
            )
        );
        assert_eq!(ConfigFault::Stage2(f).event_type(), 0x10);
    }

    proptest::proptest! {
        /// Hostile configuration structures: random memory, stream table formats, StreamIDs
        /// and SubstreamIDs. Every lookup ends with an STE/CD or a configuration fault,
        /// never a panic.
        #[test]
        fn random_structures_never_panic(
            words in proptest::collection::vec(proptest::prelude::any::<u64>(), 1024),
            split in proptest::sample::select(vec![None, Some(6u8), Some(8), Some(10)]),
            log2size in 0u8..40,
            sids in proptest::collection::vec(0u32..4096, 8),
            ssid in proptest::option::of(0u32..(1 << 20)),
        ) {
            let mem = TestMemory::new(8192);
            for (i, &w) in words.iter().enumerate() {
                mem.write_u64(i as u64 * 8, w & !bits(63, 13)).unwrap();
            }
            let table = StreamTable::new(0, log2size, split, &F).unwrap();
            for &sid in &sids {
                if let Ok(ste) = table.find_ste(&mem, &F, sid) {
                    if ste.config.stage1() {
                        let s2 = if ste.config.stage2() { ste.s2_config(&F).ok() } else { None };
                        let _ = find_cd(&mem, &ste, &F, ssid, s2.as_ref(), 0, &mut ());
                    }
                }
            }
        }
    }
}
