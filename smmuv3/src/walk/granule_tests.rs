//! The 16 KiB and 64 KiB granules, 52-bit output and TTB1: hand-computed walks, start
//! levels, concatenation, block levels, and the nested property for every granule pair.

use super::*;
use crate::builder::TableBuilder;
use crate::desc::{Descriptor as D, DescriptorKind, TableFormat};
use crate::ste::Granule;
use crate::testutil::TestMemory;
use proptest::prelude::*;
use std::collections::BTreeSet;
use vsva_mem::PhysMem;

const MB: u64 = 1 << 20;
const GB: u64 = 1 << 30;
const TB: u64 = 1 << 40;
const S1_RW_EL0: u64 = D::AF | D::AP_EL0;
const S2_RW: u64 = D::AF | D::S2AP_R | D::S2AP_W | (0xf << 2);
const G16: Granule = Granule::Size16K;
const G64: Granule = Granule::Size64K;

/// Frames of `size` bytes handed out from `[next, end)`.
struct Frames {
    next: u64,
    end: u64,
    size: u64,
}

impl Frames {
    fn new(start: u64, end: u64, granule: Granule) -> Self {
        Frames {
            next: start,
            end,
            size: 1 << granule.shift(),
        }
    }

    fn alloc(&mut self) -> Option<u64> {
        (self.next + self.size <= self.end).then(|| {
            self.next += self.size;
            self.next - self.size
        })
    }
}

fn s1_cfg(ttb0: u64, t0sz: u8, granule: Granule, ips: AddressSize, lpa: bool) -> S1Config {
    let t = S1Table::ttb0(ttb0, t0sz, granule).unwrap();
    S1Config::with_tables(t, None, ips, lpa, S1Flags::default())
}

#[test]
fn stage1_start_levels_per_granule() {
    // (granule, T0SZ, start level, entries in the start table), from the Arm ARM's
    // lookup-level tables: 16 KiB resolves 11 bits a level above bit 14, 64 KiB 13 above 16.
    let cases = [
        (G16, 16, 0, 2),
        (G16, 17, 1, 2048),
        (G16, 27, 1, 2),
        (G16, 28, 2, 2048),
        (G16, 38, 2, 2),
        (G16, 39, 3, 2048),
        (G64, 16, 1, 64),
        (G64, 22, 2, 8192),
        (G64, 34, 2, 2),
        (G64, 35, 3, 8192),
        (G64, 39, 3, 512),
        (Granule::Size4K, 25, 1, 512),
    ];
    for (g, t0sz, start, entries) in cases {
        let t = S1Table::ttb0(0, t0sz, g).unwrap();
        assert_eq!(t.start_level(), start, "{g:?} T0SZ {t0sz}");
        assert_eq!(
            start_table_bytes(g, start, t.input_bits()),
            entries * 8,
            "{g:?} T0SZ {t0sz}"
        );
    }
    // TTB bits below the start table's size are ignored (64 entries: 512 bytes).
    assert_eq!(
        S1Table::ttb0(0x1_0000 | 0x1f8, 16, G64).unwrap().root(),
        0x1_0000
    );
    for g in Granule::ALL {
        assert_eq!(S1Table::ttb0(0, 40, g), Err(TableConfigError::T0sz(40)));
        assert_eq!(S1Table::ttb1(0, 15, g), Err(TableConfigError::T1sz(15)));
    }
}

#[test]
fn stage1_hand_computed_64k_walk() {
    // 64 KiB, T0SZ 25 (39-bit VA): level 2 resolves VA[38:29] (10 bits), level 3 VA[28:16].
    let mem = TestMemory::new(MB);
    let cfg = s1_cfg(0x1_0000, 25, G64, AddressSize::Bits48, false);
    assert_eq!(cfg.start_level(), 2);
    let va = 0x51_2345_6789;
    let l2 = (va >> 29) & 0x3ff;
    let l3 = (va >> 16) & 0x1fff;
    assert_eq!((l2, l3), (0x289, 0x345));
    // The table descriptor's bits 15:12 are ignored with a 48-bit output.
    mem.write_u64(0x1_0000 + l2 * 8, 0x2_0000 | 0xf000 | 3)
        .unwrap();
    mem.write_u64(0x2_0000 + l3 * 8, 0x7_6543_0000 | S1_RW_EL0 | 3)
        .unwrap();
    let mut rec = WalkRecord::default();
    let t = walk_stage1(&mem, &cfg, va, AccessRequest::WRITE, &mut rec).unwrap();
    assert_eq!(t.output, 0x7_6543_6789);
    assert_eq!(t.page_size, PageSize::Size64K);
    let addrs: Vec<_> = rec
        .steps
        .iter()
        .map(|s| (s.level, s.entry_address))
        .collect();
    assert_eq!(addrs, [(2, 0x1_0000 + l2 * 8), (3, 0x2_0000 + l3 * 8)]);
    // A 512 MiB block at level 2 instead.
    mem.write_u64(0x1_0000 + l2 * 8, 0x6000_0000 | S1_RW_EL0 | 1)
        .unwrap();
    let t = walk_stage1(&mem, &cfg, va, AccessRequest::READ, &mut ()).unwrap();
    assert_eq!(t.output, 0x6000_0000 | (va & (512 * MB - 1)));
    assert_eq!(t.page_size, PageSize::Size512M);
}

#[test]
fn stage1_hand_computed_16k_walk() {
    // 16 KiB, T0SZ 16 (48-bit VA): level 0 resolves VA[47] (2 entries), then 11 bits a level.
    let mem = TestMemory::new(MB);
    let cfg = s1_cfg(0x4000, 16, G16, AddressSize::Bits48, false);
    assert_eq!(cfg.start_level(), 0);
    let va: u64 = 0x8123_4567_89ab;
    let idx = [
        va >> 47,
        (va >> 36) & 0x7ff,
        (va >> 25) & 0x7ff,
        (va >> 14) & 0x7ff,
    ];
    let tables = [0x4000u64, 0x8000, 0xc000, 0x1_0000];
    for level in 0..3 {
        let d = D::table_in(
            TableFormat {
                granule: G16,
                output_bits: 48,
                lpa: false,
            },
            tables[level + 1],
            0,
        );
        mem.write_u64(tables[level] + idx[level] * 8, d.0).unwrap();
    }
    mem.write_u64(tables[3] + idx[3] * 8, 0x3_0000_4000 | S1_RW_EL0 | 3)
        .unwrap();
    let t = walk_stage1(&mem, &cfg, va, AccessRequest::READ, &mut ()).unwrap();
    assert_eq!(t.output, 0x3_0000_4000 | (va & 0x3fff));
    assert_eq!(t.page_size, PageSize::Size16K);
    // A 32 MiB block at level 2; a block at level 1 does not exist without LPA2.
    mem.write_u64(tables[2] + idx[2] * 8, 0x4_0200_0000 | S1_RW_EL0 | 1)
        .unwrap();
    let t = walk_stage1(&mem, &cfg, va, AccessRequest::READ, &mut ()).unwrap();
    assert_eq!(t.output, 0x4_0200_0000 | (va & (32 * MB - 1)));
    assert_eq!(t.page_size, PageSize::Size32M);
    mem.write_u64(tables[1] + idx[1] * 8, 0x40_0000_0000 | S1_RW_EL0 | 1)
        .unwrap();
    let f = walk_stage1(&mem, &cfg, va, AccessRequest::READ, &mut ()).unwrap_err();
    assert_eq!((f.kind, f.level), (FaultKind::Translation, 1));
}

#[test]
fn block_levels_per_granule() {
    let block = D(0x400_0000_0000 | S1_RW_EL0 | 1);
    for (g, lpa, level, expect) in [
        (Granule::Size4K, false, 0, None),
        (Granule::Size4K, false, 1, Some(PageSize::Size1G)),
        (G16, true, 1, None),
        (G16, false, 2, Some(PageSize::Size32M)),
        (G64, false, 1, None),
        (G64, true, 1, Some(PageSize::Size4T)),
        (G64, false, 2, Some(PageSize::Size512M)),
        (G64, false, 3, None),
    ] {
        let fmt = TableFormat {
            granule: g,
            output_bits: 48,
            lpa,
        };
        let got = match block.decode(fmt, level) {
            DescriptorKind::Leaf { size, .. } => Some(size),
            DescriptorKind::Invalid => None,
            DescriptorKind::Table(_) => panic!("a block decoded as a table"),
        };
        assert_eq!(got, expect, "{g:?} lpa {lpa} level {level}");
        assert_eq!(
            PageSize::of(g, level, lpa),
            expect.or(if level == 3 {
                Some(g.page_size())
            } else {
                None
            })
        );
    }
    // Every size belongs to exactly one granule and level.
    for size in PageSize::ALL {
        assert_eq!(PageSize::of(size.granule(), size.level(), true), Some(size));
        assert_eq!(size.bytes(), 1 << size.shift());
    }
    assert_eq!(PageSize::Size4T.bytes(), 4 * TB);
    assert_eq!(PageSize::Size512M.bytes(), 512 * MB);
    assert_eq!(PageSize::Size32M.bytes(), 32 * MB);
}

#[test]
fn output_52_bits_with_64k() {
    // A 64 KiB page whose descriptor holds OA[51:48] = 0xa in bits 15:12.
    let mem = TestMemory::new(MB);
    let va = 0x1234_0000;
    let walk = |ips, lpa| {
        let cfg = s1_cfg(0x1_0000, 34, G64, ips, lpa);
        walk_stage1(&mem, &cfg, va | 0x44, AccessRequest::READ, &mut ())
    };
    let cfg = s1_cfg(0x1_0000, 34, G64, AddressSize::Bits52, true);
    let mut b = TableBuilder::stage1(&cfg);
    let mut frames = Frames::new(0x2_0000, MB, G64);
    b.map(
        &mem,
        &mut || frames.alloc(),
        va,
        0xa_0012_3456_0000,
        PageSize::Size64K,
        S1_RW_EL0,
    )
    .unwrap();
    let leaf = b.lookup(&mem, va).unwrap().unwrap();
    assert_eq!(leaf.descriptor & 0xf000, 0xa000);
    assert_eq!(leaf.base, 0xa_0012_3456_0000);
    assert_eq!(
        walk(AddressSize::Bits52, true).unwrap().output,
        0xa_0012_3456_0044
    );
    // With a 48-bit IPS bits 15:12 are not address bits: ignored.
    assert_eq!(
        walk(AddressSize::Bits48, true).unwrap().output,
        0x12_3456_0044
    );
    // An output beyond a smaller IPS is an Address size fault.
    let f = walk(AddressSize::Bits32, true).unwrap_err();
    assert_eq!((f.kind, f.level), (FaultKind::AddrSize, 3));
    // The builder refuses what the format cannot hold.
    let mut b48 = TableBuilder::stage1(&s1_cfg(0x1_0000, 34, G64, AddressSize::Bits48, false));
    let pa52 = 0xa_0000_0000_0000;
    assert_eq!(
        b48.map(&mem, &mut || None, va, pa52, PageSize::Size64K, 0),
        Err(crate::builder::BuildError::OutputTooWide(pa52))
    );
    assert_eq!(
        b48.map(&mem, &mut || None, 0, 0, PageSize::Size4T, 0),
        Err(crate::builder::BuildError::NoSuchLeaf(PageSize::Size4T))
    );
    assert_eq!(
        b48.map(&mem, &mut || None, 0, 0, PageSize::Size2M, 0),
        Err(crate::builder::BuildError::NoSuchLeaf(PageSize::Size2M))
    );
    // With the 4 KiB granule a 52-bit IPS is 48 bits: bits 15:12 are address bits.
    assert_eq!(AddressSize::Bits52.effective_bits(Granule::Size4K), 48);
    assert_eq!(AddressSize::Bits52.effective_bits(G16), 48);
    assert_eq!(AddressSize::Bits52.effective_bits(G64), 52);
}

#[test]
fn ttb1_upper_range() {
    // TTB0: 4 KiB, 39-bit; TTB1: 16 KiB, 42-bit upper range (T1SZ 22), TBI1 on.
    let mem = TestMemory::new(4 * MB);
    let ttb0 = S1Table::ttb0(0x1000, 25, Granule::Size4K).unwrap();
    let ttb1 = S1Table::ttb1(0x8000, 22, G16).unwrap();
    assert_eq!(ttb1.start_level(), 1);
    let flags = S1Flags {
        tbi1: true,
        ..S1Flags::default()
    };
    let cfg = S1Config::with_tables(ttb0, Some(ttb1), AddressSize::Bits48, false, flags);
    let mut upper = TableBuilder::stage1_ttb1(&cfg).unwrap();
    let mut lower = TableBuilder::stage1(&cfg);
    let mut frames = Frames::new(MB, 4 * MB, G16);
    let hi: u64 = 0xffff_ff12_3456_0000;
    upper
        .map(
            &mem,
            &mut || frames.alloc(),
            hi,
            0x20_0000,
            PageSize::Size16K,
            S1_RW_EL0,
        )
        .unwrap();
    lower
        .map(
            &mem,
            &mut || frames.alloc(),
            0x12_3456_0000,
            0x30_0000,
            PageSize::Size4K,
            S1_RW_EL0,
        )
        .unwrap();
    let walk = |cfg: &S1Config, va| walk_stage1(&mem, cfg, va, AccessRequest::READ, &mut ());
    assert_eq!(walk(&cfg, hi | 0x123).unwrap().output, 0x20_0123);
    assert_eq!(walk(&cfg, 0x12_3456_0123).unwrap().output, 0x30_0123);
    // TBI1: the top byte of an upper VA is ignored; without it the VA is out of range.
    let tagged = (hi & !(0xff << 56)) | 0x5a << 56;
    assert_eq!(walk(&cfg, tagged | 0x8).unwrap().output, 0x20_0008);
    let no_tbi = S1Config::with_tables(
        ttb0,
        Some(ttb1),
        AddressSize::Bits48,
        false,
        S1Flags::default(),
    );
    assert_eq!(walk(&no_tbi, hi).unwrap().output, 0x20_0000);
    let f = walk(&no_tbi, tagged).unwrap_err();
    assert_eq!(
        (f.kind, f.level, f.stage),
        (FaultKind::Translation, 0, FaultStage::Stage1)
    );
    // Bits 54:42 must all be ones (bit 55 selects TTB1).
    let f = walk(&cfg, hi & !(1 << 50)).unwrap_err();
    assert_eq!((f.kind, f.level), (FaultKind::Translation, 0));
    // EPD1: the whole upper range faults; TTB0 still walks.
    let epd1 = S1Config::with_tables(ttb0, None, AddressSize::Bits48, false, flags);
    assert_eq!(walk(&epd1, hi).unwrap_err().kind, FaultKind::Translation);
    assert!(walk(&epd1, 0x12_3456_0000).is_ok());
    // EPD0 leaves TTB1 walking.
    let epd0 = S1Config::with_tables(
        ttb0,
        Some(ttb1),
        AddressSize::Bits48,
        false,
        S1Flags {
            epd0: true,
            ..flags
        },
    );
    assert!(walk(&epd0, 0x12_3456_0000).is_err());
    assert!(walk(&epd0, hi).is_ok());
    // The walk reads TTB1's table, at the level T1SZ and TG1 give.
    let mut rec = WalkRecord::default();
    walk_stage1(&mem, &cfg, hi, AccessRequest::READ, &mut rec).unwrap();
    assert_eq!(rec.steps[0].table, 0x8000);
    assert_eq!(
        rec.steps.iter().map(|s| s.level).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    // Walks from the starts the record gives match the full walk (walk caches use them).
    let fmt = cfg.format(&ttb1);
    let mut start = S1Start::of(&ttb1);
    for step in &rec.steps {
        let t = walk_stage1_from(
            &mem,
            &cfg,
            &mut Direct,
            start,
            hi,
            AccessRequest::READ,
            &mut (),
        );
        assert_eq!(t.unwrap().output, 0x20_0000);
        start = start.below(fmt, step.entry);
    }
    // A TTB1 builder refuses lower-range VAs and the other way round.
    assert_eq!(
        upper.lookup(&mem, 0x12_3456_0000),
        Err(crate::builder::BuildError::OutOfRange(0x12_3456_0000))
    );
    assert_eq!(
        lower.lookup(&mem, hi),
        Err(crate::builder::BuildError::OutOfRange(hi))
    );
}

/// S2SL0 for each granule: which S2T0SZ it accepts, the start level and concatenation,
/// against the Arm ARM's tables written out (start level's lowest bit, stride).
#[test]
fn stage2_sl0_per_granule() {
    // (granule, SL0, start level, the level's shift, stride)
    let table = [
        (Granule::Size4K, 0, 2, 21, 9),
        (Granule::Size4K, 1, 1, 30, 9),
        (Granule::Size4K, 2, 0, 39, 9),
        (G16, 0, 3, 14, 11),
        (G16, 1, 2, 25, 11),
        (G16, 2, 1, 36, 11),
        (G64, 0, 3, 16, 13),
        (G64, 1, 2, 29, 13),
        (G64, 2, 1, 42, 13),
    ];
    let mut valid = 0;
    for g in Granule::ALL {
        for sl0 in 0..4u8 {
            for t0sz in 16..=39u8 {
                let got = S2Config::with_granule(
                    0,
                    t0sz,
                    sl0,
                    g,
                    AddressSize::Bits48,
                    false,
                    S2Flags::default(),
                );
                let bits = 64 - t0sz as u32;
                let row = table.iter().find(|r| r.0 == g && r.1 == sl0);
                match row {
                    Some(&(_, _, start, shift, stride))
                        if bits > shift && bits - shift <= stride + 4 =>
                    {
                        let cfg = got.unwrap();
                        valid += 1;
                        assert_eq!(cfg.start_level(), start);
                        let tables = (1u64 << (bits - shift)) >> stride;
                        assert_eq!(cfg.concatenated_tables(), tables.max(1));
                    }
                    _ => assert_eq!(
                        got,
                        Err(TableConfigError::S2sl0 {
                            s2sl0: sl0,
                            s2t0sz: t0sz
                        }),
                        "{g:?} SL0 {sl0} T0SZ {t0sz}"
                    ),
                }
            }
        }
    }
    // 32 (S2SL0, S2T0SZ) pairs per granule.
    assert_eq!(valid, 96);
}

#[test]
fn stage2_every_block_size_per_granule() {
    for (g, t0sz, sl0, lpa) in [(G16, 17, 2, false), (G64, 16, 2, true), (G64, 22, 1, false)] {
        let mem = TestMemory::new(4 * MB);
        let cfg = S2Config::with_granule(
            0,
            t0sz,
            sl0,
            g,
            AddressSize::Bits48,
            lpa,
            S2Flags::default(),
        )
        .unwrap();
        let mut b = TableBuilder::stage2(&cfg);
        let mut frames = Frames::new(MB, 4 * MB, g);
        for size in PageSize::ALL {
            if size.granule() != g
                || PageSize::of(g, size.level(), lpa).is_none()
                || size.level() < cfg.start_level()
            {
                continue;
            }
            let ipa = 3 * size.bytes();
            let pa = 5 * size.bytes();
            b.map(&mem, &mut || frames.alloc(), ipa, pa, size, S2_RW)
                .unwrap();
            let mut rec = WalkRecord::default();
            let t = walk_stage2(&mem, &cfg, ipa + 0x1238, AccessRequest::WRITE, &mut rec).unwrap();
            assert_eq!((t.output, t.page_size), (pa + 0x1238, size), "{size:?}");
            assert_eq!(rec.steps.len() as u8, size.level() - cfg.start_level() + 1);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Property: nested == stage 1 composed with stage 2, for every granule pair

/// Guest RAM: IPA `[0, GUEST)` at PA `GUEST`; stage-1 tables in it from IPA 1 MiB.
const GUEST: u64 = 4 * MB;

/// A valid (S2T0SZ, S2SL0) per granule for the property, some with concatenation.
fn s2_shapes(g: Granule) -> Vec<(u8, u8)> {
    match g {
        Granule::Size4K => vec![(16, 2), (24, 1), (31, 0)],
        Granule::Size16K => vec![(24, 1), (28, 1), (17, 2)],
        Granule::Size64K => vec![(22, 1), (18, 2), (34, 0)],
    }
}

/// The size of class `c` (0 page, 1 level-2 block, 2 level-1 block or else the level-2
/// block; 4 TiB blocks do not fit the property's address layout).
fn size_of_class(g: Granule, c: u8) -> PageSize {
    let level = 3 - c.min(2);
    PageSize::of(g, level, false).unwrap_or_else(|| PageSize::of(g, 2, false).unwrap())
}

#[derive(Debug, Clone)]
struct Case {
    g1: Granule,
    g2: Granule,
    t0sz: u8,
    s2: usize,
    small_ips: bool,
    small_ps: bool,
    hole: Option<usize>,
    s1_maps: Vec<(u64, u64, u8, u64)>,
    s2_maps: Vec<(u64, u8, u64)>,
    probes: Vec<(Option<usize>, u64, AccessRequest)>,
}

fn arb_access() -> impl Strategy<Value = AccessRequest> {
    (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(write, instruction, privileged)| {
        AccessRequest {
            write,
            instruction,
            privileged,
        }
    })
}

fn arb_case(g1: Granule, g2: Granule) -> impl Strategy<Value = Case> {
    (
        prop::sample::select(vec![16u8, 25, 30, 36]),
        0usize..3,
        prop::bool::weighted(0.15),
        prop::bool::weighted(0.15),
        prop::option::weighted(0.2, 0usize..8),
        prop::collection::vec(
            (
                0u64..64,
                0u64..4,
                0u8..3,
                prop_oneof![2 => Just(1u64), 1 => 0u64..4],
                prop::bool::weighted(0.9),
            ),
            1..10,
        ),
        prop::collection::vec(
            (
                0u64..4,
                0u8..3,
                prop_oneof![2 => Just(3u64), 1 => 0u64..4],
                prop::bool::weighted(0.9),
                prop::bool::weighted(0.2),
            ),
            1..10,
        ),
        prop::collection::vec(
            (
                prop::option::weighted(0.9, 0usize..10),
                0u64..(1 << 30),
                arb_access(),
            ),
            1..12,
        ),
    )
        .prop_map(
            move |(t0sz, s2, small_ips, small_ps, hole, s1m, s2m, probes)| Case {
                g1,
                g2,
                t0sz,
                s2,
                small_ips,
                small_ps,
                hole,
                s1_maps: s1m
                    .into_iter()
                    .map(|(va, ipa, c, ap, af)| (va, ipa, c, ap << 6 | if af { D::AF } else { 0 }))
                    .collect(),
                s2_maps: s2m
                    .into_iter()
                    .map(|(ipa, c, s2ap, af, xn)| {
                        (
                            ipa,
                            c,
                            s2ap << 6
                                | (0xf << 2)
                                | if af { D::AF } else { 0 }
                                | if xn { D::XN } else { 0 },
                        )
                    })
                    .collect(),
                probes,
            },
        )
}

/// A memory seen at an offset (the guest's IPA view of its RAM).
struct Offset<'a> {
    inner: &'a TestMemory,
    base: u64,
}

impl PhysMem for Offset<'_> {
    fn read_u64(&self, addr: u64) -> Result<u64, vsva_mem::MemError> {
        self.inner.read_u64(self.base + addr)
    }
    fn fetch_or_u64(&self, addr: u64, bits: u64) -> Result<u64, vsva_mem::MemError> {
        self.inner.fetch_or_u64(self.base + addr, bits)
    }
    fn compare_exchange_u64(
        &self,
        addr: u64,
        old: u64,
        new: u64,
    ) -> Result<u64, vsva_mem::MemError> {
        self.inner.compare_exchange_u64(self.base + addr, old, new)
    }
    fn write_u64(&self, addr: u64, value: u64) -> Result<(), vsva_mem::MemError> {
        self.inner.write_u64(self.base + addr, value)
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), vsva_mem::MemError> {
        self.inner.read(self.base + addr, buf)
    }
    fn write(&self, addr: u64, buf: &[u8]) -> Result<(), vsva_mem::MemError> {
        self.inner.write(self.base + addr, buf)
    }
}

/// The outcome class of a walk: translated, or the fault kind with its stage and CLASS.
type Outcome = Option<(FaultKind, Option<FaultClass>)>;

fn outcome(r: &Result<Translation, WalkFault>) -> Outcome {
    r.as_ref().err().map(|f| match f.stage {
        FaultStage::Stage1 => (f.kind, None),
        FaultStage::Stage2 { class, .. } => (f.kind, Some(class)),
    })
}

/// Runs one case; returns the outcomes of its probes.
fn run_case(c: &Case) -> Result<Vec<Outcome>, TestCaseError> {
    let lpa = true;
    let mem = TestMemory::new(8 * MB);
    let ips = if c.small_ips {
        AddressSize::Bits32
    } else {
        AddressSize::Bits48
    };
    let ps = if c.small_ps {
        AddressSize::Bits32
    } else {
        AddressSize::Bits48
    };
    let s1 = s1_cfg(0, c.t0sz, c.g1, ips, lpa);
    let (s2t0sz, sl0) = s2_shapes(c.g2)[c.s2];
    let s2 = S2Config::with_granule(0, s2t0sz, sl0, c.g2, ps, lpa, S2Flags::default()).unwrap();
    // Stage-2 tables below 1 MiB (the largest concatenated start table is 1 MiB), their
    // frames in [1, 4) MiB; guest RAM mapped page by page so a hole can be punched.
    let mut s2b = TableBuilder::stage2(&s2);
    let mut s2f = Frames::new(MB, GUEST, c.g2);
    let page2 = c.g2.page_size();
    for ipa in (0..GUEST).step_by(page2.bytes() as usize) {
        s2b.map(&mem, &mut || s2f.alloc(), ipa, GUEST + ipa, page2, S2_RW)
            .unwrap();
    }
    let guest = Offset {
        inner: &mem,
        base: GUEST,
    };
    let mut s1b = TableBuilder::stage1(&s1);
    let mut s1f = Frames::new(MB, GUEST, c.g1);
    let mut vas = Vec::new();
    for &(va, ipa, class, attrs) in &c.s1_maps {
        let size = size_of_class(c.g1, class);
        let va = (va << size.shift()) & ((1 << s1.input_bits()) - 1);
        let ipa = 4 * GB + ((ipa << size.shift()) & (GB - 1));
        if s1b
            .map(&guest, &mut || s1f.alloc(), va, ipa, size, attrs)
            .is_ok()
        {
            vas.push((va, size));
        }
    }
    for &(ipa, class, attrs) in &c.s2_maps {
        let size = size_of_class(c.g2, class);
        let ipa = 4 * GB + ((ipa << size.shift()) & (GB - 1));
        if ipa >> s2.input_bits() == 0 {
            let _ = s2b.map(
                &mem,
                &mut || s2f.alloc(),
                ipa,
                0x10_0000_0000 + ipa,
                size,
                attrs,
            );
        }
    }
    // A stage-1 table whose IPA stage 2 no longer maps: CLASS TT faults.
    if let Some(h) = c.hole {
        if let Some(&frame) = s1b.tables().get(h % s1b.tables().len().max(1)) {
            let page = frame & !(page2.bytes() - 1);
            s2b.unmap(&mem, page, page2).unwrap();
        }
    }
    let mut seen = Vec::new();
    for &(i, off, access) in &c.probes {
        let va = match i.and_then(|i| vas.get(i % vas.len().max(1))) {
            Some(&(va, size)) => va + (off & (size.bytes() - 1)),
            None => off,
        };
        let nested = walk_nested(&mem, &s1, &s2, va, access, &mut WalkRecord::default());
        // Stage 1 alone over the guest's view, where only the hole differs: a table read
        // that stage 2 refuses is a stage-2 fault in the nested walk, so compare the rest.
        let first = walk_stage1(&guest, &s1, va, access, &mut ());
        let expected = first.and_then(|t1| {
            walk_stage2(&mem, &s2, t1.output, access, &mut ())
                .map(|t2| Translation {
                    output: t2.output,
                    page_size: t1.page_size.min(t2.page_size),
                    perms: t1.perms.intersect(t2.perms),
                    dirty: t1.dirty && t2.dirty,
                    global: t1.global,
                })
                .map_err(|f| WalkFault { input: va, ..f })
        });
        let tt = matches!(
            nested,
            Err(WalkFault {
                stage: FaultStage::Stage2 {
                    class: FaultClass::Tt,
                    ..
                },
                ..
            })
        );
        if tt {
            prop_assert!(
                c.hole.is_some(),
                "a CLASS TT fault without a hole: {:?}",
                nested
            );
        } else {
            prop_assert_eq!(nested, expected, "va {:#x} {:?}", va, access);
        }
        seen.push(outcome(&nested));
    }
    Ok(seen)
}

#[test]
fn nested_equals_stage1_then_stage2_every_granule_pair() {
    use proptest::test_runner::{Config, TestRunner};
    let mut total: BTreeSet<String> = BTreeSet::new();
    for g1 in Granule::ALL {
        for g2 in Granule::ALL {
            let seen = std::cell::RefCell::new(BTreeSet::new());
            let translated = std::cell::Cell::new(0u32);
            TestRunner::new(Config {
                failure_persistence: None,
                ..Config::with_cases(48)
            })
            .run(&arb_case(g1, g2), |c| {
                for o in run_case(&c)? {
                    if o.is_none() {
                        translated.set(translated.get() + 1);
                    }
                    seen.borrow_mut().insert(format!("{o:?}"));
                }
                Ok(())
            })
            .unwrap();
            assert!(translated.get() > 0, "{g1:?}/{g2:?}: nothing translated");
            total.extend(seen.into_inner());
        }
    }
    println!("nested property, every granule pair: outcomes {total:?}");
    // Every fault class the configurations can produce was produced.
    for kind in [
        (FaultKind::Translation, None),
        (FaultKind::AddrSize, None),
        (FaultKind::Access, None),
        (FaultKind::Permission, None),
        (FaultKind::Translation, Some(FaultClass::Tt)),
        (FaultKind::Translation, Some(FaultClass::In)),
        (FaultKind::AddrSize, Some(FaultClass::In)),
        (FaultKind::Access, Some(FaultClass::In)),
        (FaultKind::Permission, Some(FaultClass::In)),
    ] {
        let key = format!("{:?}", Some(kind));
        assert!(total.contains(&key), "never saw {key}");
    }
}
