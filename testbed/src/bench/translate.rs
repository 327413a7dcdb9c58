//! Translation workloads: IOTLB hits (one and two threads) against a plain hash map, and
//! cold walks with every IOMMU cache empty.
//!
//! Each workload checks every translation it times (a hit must come from the IOTLB, a cold
//! translation from a walk) and fails when one does not, so a figure never measures a path
//! other than the one it names.

use std::hint::black_box;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vsva_hw::iommu::{Iommu, Source};
use vsva_hw::memory::PAGE_SIZE;
use vsva_vtd::{
    addr::Pasid, addr::SourceId, inv_desc::InvDesc, walk::walk_nested, walk::walk_second_level,
    walk::AccessRequest, walk::FlConfig, walk::SlConfig,
};

use super::lockstep::{SampleHalf, SecondThread};
use super::platform::Platform;
use super::{BenchError, Workload};

/// Pages in the IOTLB-hit working set.
pub const WORKING_SET: u64 = 1024;
/// Length of the precomputed random address sequence (a power of two).
const SEQUENCE: usize = 1 << 14;

/// xorshift64*: a small deterministic generator for address sequences.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// Random 8-byte aligned addresses (buffer offsets) over the first `pages` pages.
fn random_offsets(seed: u64, pages: u64) -> Box<[u64]> {
    let mut state = seed | 1;
    (0..SEQUENCE)
        .map(|_| {
            let r = next_random(&mut state);
            (r % pages) * PAGE_SIZE + (r >> 32) % (PAGE_SIZE / 8) * 8
        })
        .collect()
}

/// One address space's hits: the loop both the one- and two-thread workloads time.
struct HitLoop {
    iommu: Arc<Iommu>,
    sid: SourceId,
    pasid: Pasid,
    addrs: Box<[u64]>,
    pos: usize,
}

impl HitLoop {
    fn new(p: &Platform, seed: u64) -> Result<Self, BenchError> {
        if p.buffer_len() < WORKING_SET * PAGE_SIZE {
            return Err(BenchError::Check(format!(
                "the guest buffer holds fewer than {WORKING_SET} pages"
            )));
        }
        let addrs = random_offsets(seed, WORKING_SET)
            .iter()
            .map(|&off| p.gva(off))
            .collect();
        let hits = HitLoop {
            iommu: p.iommu().clone(),
            sid: p.device(0),
            pasid: p.nested_pasid(),
            addrs,
            pos: 0,
        };
        for page in 0..WORKING_SET {
            hits.iommu.translate(
                hits.sid,
                Some(hits.pasid),
                p.gva(page * PAGE_SIZE),
                AccessRequest::READ,
            )?;
        }
        Ok(hits)
    }

    /// `iters` translations; `false` when one was not an IOTLB hit.
    fn hits(&mut self, iters: u64) -> bool {
        let mask = self.addrs.len() - 1;
        let mut all_hits = true;
        for _ in 0..iters {
            let addr = self.addrs[self.pos & mask];
            self.pos = self.pos.wrapping_add(1);
            let hpa =
                match self
                    .iommu
                    .translate(self.sid, Some(self.pasid), addr, AccessRequest::READ)
                {
                    Ok(m) if m.source == Source::Iotlb => Some(m.hpa),
                    _ => None,
                };
            all_hits &= hpa.is_some();
            // The host address is what the map baseline yields too: made opaque as the
            // map's is, not the whole result, whose narrow fields a store to the stack
            // and an 8-byte reload would stall on (store forwarding) in the loop alone.
            black_box(hpa);
        }
        all_hits
    }
}

fn not_a_hit() -> BenchError {
    BenchError::Check("a translation of the working set missed the IOTLB".into())
}

/// IOTLB hits: nested translations of random addresses over a 1,024-page working set.
pub struct IotlbHits(HitLoop);

impl IotlbHits {
    /// Warms the IOTLB with the working set of `p`'s guest buffer (at least 1,024 pages).
    pub fn new(p: &Platform) -> Result<Self, BenchError> {
        HitLoop::new(p, 0x9e37_79b9_7f4a_7c15).map(IotlbHits)
    }
}

impl Workload for IotlbHits {
    fn run(&mut self, iters: u64) -> Result<Duration, BenchError> {
        let start = Instant::now();
        let ok = self.0.hits(iters);
        let t = start.elapsed();
        ok.then_some(t).ok_or_else(not_a_hit)
    }
}

/// The baseline of IOTLB hits: the same addresses looked up in a
/// `HashMap<(u16, u32, u64), u64>` with foldhash, keyed by requester id, PASID and page.
pub struct HashMapLookups {
    map: foldhash::HashMap<(u16, u32, u64), u64>,
    rid: u16,
    pasid: u32,
    addrs: Box<[u64]>,
    pos: usize,
}

impl HashMapLookups {
    /// The working set of [`IotlbHits::new`] on `p`, with the same address sequence.
    pub fn new(p: &Platform) -> Result<Self, BenchError> {
        let hits = HitLoop::new(p, 0x9e37_79b9_7f4a_7c15)?;
        let (rid, pasid) = (hits.sid.rid(), hits.pasid.raw());
        let map = (0..WORKING_SET)
            .map(|page| {
                let off = page * PAGE_SIZE;
                ((rid, pasid, p.gva(off) >> 12), p.hpa(off))
            })
            .collect();
        Ok(HashMapLookups {
            map,
            rid,
            pasid,
            addrs: hits.addrs,
            pos: 0,
        })
    }
}

impl Workload for HashMapLookups {
    fn run(&mut self, iters: u64) -> Result<Duration, BenchError> {
        let mask = self.addrs.len() - 1;
        let mut all_found = true;
        let start = Instant::now();
        for _ in 0..iters {
            let addr = self.addrs[self.pos & mask];
            self.pos = self.pos.wrapping_add(1);
            let hpa = self
                .map
                .get(&(self.rid, self.pasid, addr >> 12))
                .map(|page| page | (addr & (PAGE_SIZE - 1)));
            all_found &= hpa.is_some();
            black_box(hpa);
        }
        let t = start.elapsed();
        all_found
            .then_some(t)
            .ok_or_else(|| BenchError::Check("a working-set key was not in the map".into()))
    }
}

/// IOTLB hits on two threads sharing one IOMMU, each with its own random sequence over the
/// same working set. An operation is one hit on each thread; its time is wall time, so
/// the two-thread speedup is `2 × (one-thread ns) / (this ns)`.
///
/// The second thread runs its hits in lockstep with the timing thread
/// (`SecondThread`), so a sample times hits, not thread start-up or wake-up.
pub struct TwoThreadHits {
    hits: HitLoop,
    other: SecondThread,
}

impl SampleHalf for HitLoop {
    fn work(&mut self, iters: u64) -> Result<(), BenchError> {
        self.hits(iters).then_some(()).ok_or_else(not_a_hit)
    }
}

impl TwoThreadHits {
    /// Warms the IOTLB as [`IotlbHits::new`] does and starts the second thread.
    pub fn new(p: &Platform) -> Result<Self, BenchError> {
        let hits = HitLoop::new(p, 0x243f_6a88_85a3_08d3)?;
        let other_hits = HitLoop::new(p, 0x1319_8a2e_0370_7344)?;
        Ok(TwoThreadHits {
            hits,
            other: SecondThread::spawn("iotlb-hits", other_hits)?,
        })
    }
}

impl Workload for TwoThreadHits {
    fn run(&mut self, iters: u64) -> Result<Duration, BenchError> {
        let hits = &mut self.hits;
        let s = self.other.sample(iters, || hits.hits(iters))?;
        s.mine.then_some(s.wall).ok_or_else(not_a_hit)
    }
}

/// Which translation a cold walk does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkKind {
    /// A request without PASID, second level only (RID_PASID entry).
    SecondLevel,
    /// A request with the nested PASID: 4-level first over 4-level second level.
    Nested,
}

impl WalkKind {
    /// The fewest page-table entries a walk reads when every cache is empty as it starts.
    /// A nested walk fills the second-level paging-structure caches as it goes: 4
    /// first-level entries, one full second-level walk, then at least the last level of
    /// the second-level walks of the other 3 tables and the output (a cache that survived
    /// an invalidation would save more).
    pub const fn table_reads(self) -> u64 {
        match self {
            WalkKind::SecondLevel => 4,
            WalkKind::Nested => 4 + 4 + 4,
        }
    }
}

/// What an empty timed region measures: the cost of reading the clock twice, taken off
/// each timed translation of [`ColdWalks`]. The median of 15 rounds of 2,000 regions.
pub(super) fn timer_overhead() -> Duration {
    let mut rounds: Vec<Duration> = (0..15)
        .map(|_| {
            let mut total = Duration::ZERO;
            for _ in 0..2000 {
                let start = Instant::now();
                total += black_box(start).elapsed();
            }
            total / 2000
        })
        .collect();
    rounds.sort();
    rounds[rounds.len() / 2]
}

/// Which caches are emptied before each cold translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flush {
    /// Context cache, PASID cache, IOTLB and paging-structure caches: global
    /// context-cache, PASID-cache and IOTLB invalidations.
    All,
    /// IOTLB and paging-structure caches only (a global IOTLB invalidation); the context
    /// and PASID caches stay warm.
    Translations,
}

/// Translations that walk from the top: device 0 translates the same address after each
/// invalidation, so it walks the page tables from the top, which the workload checks in
/// the IOMMU's table-read count. With [`ColdWalks::new`] every IOMMU cache is empty and the
/// root, context and PASID tables are read too; with [`ColdWalks::misses`] the context and
/// PASID caches stay warm. The tables stay warm in the CPU caches.
///
/// Each translation is timed alone, since the invalidation before it is not part of the
/// figure, and the clock's own cost (an empty timed region, about 25 ns here) is taken off.
pub struct ColdWalks<'a> {
    platform: &'a Platform,
    kind: WalkKind,
    flush: Flush,
    overhead: Duration,
}

impl<'a> ColdWalks<'a> {
    /// Walks of `kind` on `p` with every IOMMU cache empty.
    pub fn new(p: &'a Platform, kind: WalkKind) -> Self {
        ColdWalks {
            platform: p,
            kind,
            flush: Flush::All,
            overhead: timer_overhead(),
        }
    }

    /// Walks of `kind` on `p` after IOTLB misses: IOTLB and paging-structure caches empty,
    /// context and PASID caches warm.
    pub fn misses(p: &'a Platform, kind: WalkKind) -> Self {
        ColdWalks {
            flush: Flush::Translations,
            ..ColdWalks::new(p, kind)
        }
    }

    fn flush(&self) -> Result<(), BenchError> {
        match self.flush {
            Flush::All => self.platform.invalidate_all(),
            Flush::Translations => self
                .platform
                .invalidate(&[InvDesc::global_iotlb(true, true)]),
        }
    }
}

impl Workload for ColdWalks<'_> {
    fn run(&mut self, iters: u64) -> Result<Duration, BenchError> {
        let p = self.platform;
        let iommu = p.iommu();
        let (pasid, addr) = match self.kind {
            WalkKind::SecondLevel => (None, p.gpa(0)),
            WalkKind::Nested => (Some(p.nested_pasid()), p.gva(0)),
        };
        let reads = || iommu.stats().table_reads.load(Ordering::Relaxed);
        // Warms the context and PASID caches (emptied again by a full flush).
        iommu.translate(p.device(0), pasid, addr, AccessRequest::READ)?;
        let mut total = Duration::ZERO;
        let mut all_walked = true;
        let mut table_reads = 0;
        for _ in 0..iters {
            self.flush()?;
            let before = reads();
            let start = Instant::now();
            let r = iommu.translate(p.device(0), pasid, addr, AccessRequest::READ);
            total += start.elapsed().saturating_sub(self.overhead);
            table_reads += reads() - before;
            all_walked &= matches!(r, Ok(m) if m.source == Source::Walk);
        }
        if !all_walked {
            return Err(BenchError::Check(
                "a translation after a global IOTLB invalidation did not walk".into(),
            ));
        }
        let cold = iters * self.kind.table_reads();
        if table_reads < cold {
            return Err(BenchError::Check(format!(
                "{iters} cold {:?} walks read {table_reads} entries, fewer than the {cold} of \
                 walks from the top: a cache survived the global invalidation",
                self.kind
            )));
        }
        Ok(total)
    }
}

/// The walk alone: the VT-d walker the IOMMU's miss path runs, over the same host memory
/// and tables as [`ColdWalks`], with no IOMMU cache looked up or filled and no context or
/// PASID entry read (the configurations are the PASID entries'). Each walk's output must be
/// the expected host address.
pub struct WalkOnly<'a> {
    platform: &'a Platform,
    kind: WalkKind,
    fl: FlConfig,
    sl: SlConfig,
}

impl<'a> WalkOnly<'a> {
    /// Walks of `kind` of the first byte of `p`'s guest buffer.
    pub fn new(p: &'a Platform, kind: WalkKind) -> Result<Self, BenchError> {
        Ok(WalkOnly {
            platform: p,
            kind,
            fl: p.fl_config()?,
            sl: p.sl_config()?,
        })
    }
}

impl Workload for WalkOnly<'_> {
    fn run(&mut self, iters: u64) -> Result<Duration, BenchError> {
        let p = self.platform;
        let mem = &**p.memory();
        let want = p.hpa(0);
        let mut all_right = true;
        let start = Instant::now();
        for _ in 0..iters {
            let t = match self.kind {
                WalkKind::SecondLevel => {
                    walk_second_level(mem, &self.sl, p.gpa(0), AccessRequest::READ, &mut ())
                }
                WalkKind::Nested => walk_nested(
                    mem,
                    &self.fl,
                    &self.sl,
                    p.gva(0),
                    AccessRequest::READ,
                    &mut (),
                ),
            };
            all_right &= matches!(black_box(t), Ok(t) if t.output == want);
        }
        let elapsed = start.elapsed();
        all_right.then_some(elapsed).ok_or_else(|| {
            BenchError::Check(format!(
                "a {:?} walk did not translate to {want:#x}",
                self.kind
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::platform::PlatformConfig;

    fn platform() -> Platform {
        Platform::new(PlatformConfig {
            devices: 8,
            buffer: WORKING_SET * PAGE_SIZE,
        })
        .unwrap()
    }

    #[test]
    fn random_offsets_cover_the_working_set_only() {
        let offs = random_offsets(7, WORKING_SET);
        assert!(offs
            .iter()
            .all(|&o| o < WORKING_SET * PAGE_SIZE && o % 8 == 0));
        let pages: std::collections::BTreeSet<_> = offs.iter().map(|o| o / PAGE_SIZE).collect();
        assert!(pages.len() > 1000, "{} pages", pages.len());
    }

    #[test]
    fn hits_walk_no_table() {
        let p = platform();
        let mut hits = IotlbHits::new(&p).unwrap();
        let walks = p.iommu().stats().walks.load(Ordering::Relaxed);
        hits.run(5000).unwrap();
        let mut two = TwoThreadHits::new(&p).unwrap();
        for _ in 0..3 {
            two.run(1000).unwrap();
        }
        assert_eq!(p.iommu().stats().walks.load(Ordering::Relaxed), walks);
        HashMapLookups::new(&p).unwrap().run(5000).unwrap();
    }

    #[test]
    fn hits_fail_once_the_iotlb_is_emptied() {
        let p = platform();
        let mut hits = IotlbHits::new(&p).unwrap();
        let mut two = TwoThreadHits::new(&p).unwrap();
        two.run(10).unwrap();
        p.invalidate_all().unwrap();
        assert!(matches!(hits.run(10), Err(BenchError::Check(_))));
        assert!(matches!(two.run(10), Err(BenchError::Check(_))));
    }

    #[test]
    fn the_second_thread_hits_in_every_sample() {
        let p = platform();
        let mut two = TwoThreadHits::new(&p).unwrap();
        for _ in 0..5 {
            two.run(100).unwrap();
        }
        assert_eq!(two.other.samples_done(), 5);
    }

    #[test]
    fn the_map_answers_what_the_iommu_answers() {
        let p = platform();
        let mut map = HashMapLookups::new(&p).unwrap();
        for _ in 0..100 {
            let addr = map.addrs[map.pos];
            map.pos += 1;
            let want = p
                .iommu()
                .translate(
                    p.device(0),
                    Some(p.nested_pasid()),
                    addr,
                    AccessRequest::READ,
                )
                .unwrap()
                .hpa;
            let page = map.map[&(map.rid, map.pasid, addr >> 12)];
            assert_eq!(page | (addr & 0xfff), want);
        }
    }

    #[test]
    fn walks_alone_translate_and_read_no_cache() {
        let p = platform();
        let walks = p.iommu().stats().walks.load(Ordering::Relaxed);
        for kind in [WalkKind::SecondLevel, WalkKind::Nested] {
            WalkOnly::new(&p, kind).unwrap().run(50).unwrap();
        }
        assert_eq!(p.iommu().stats().walks.load(Ordering::Relaxed), walks);
        // A walk whose tables no longer give the expected address fails its check.
        let mut wrong = WalkOnly::new(&p, WalkKind::Nested).unwrap();
        wrong.sl.root += PAGE_SIZE;
        assert!(matches!(wrong.run(1), Err(BenchError::Check(_))));
    }

    #[test]
    fn every_cold_translation_walks() {
        let p = platform();
        for kind in [WalkKind::SecondLevel, WalkKind::Nested] {
            for mut cold in [ColdWalks::new(&p, kind), ColdWalks::misses(&p, kind)] {
                p.invalidate_all().unwrap();
                let walks = p.iommu().stats().walks.load(Ordering::Relaxed);
                cold.run(20).unwrap();
                // 20 cold translations, and the warming one.
                assert_eq!(p.iommu().stats().walks.load(Ordering::Relaxed), walks + 21);
            }
        }
    }
}
