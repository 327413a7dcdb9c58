//! The stage-1 invalidation an `IOMMU_HWPT_INVALIDATE` array asks for, as the fewest
//! descriptors (`intel_nested_cache_invalidate_user`, VT-d §6.5.2.4 and §6.5.2.6).
//!
//! Each entry names the naturally aligned block of pages covering its range, as Linux's
//! `calculate_psi_aligned_address` computes it; `addr 0, npages U64_MAX` names every
//! address. Entries whose blocks overlap or touch the run before them join it (a LEAF
//! entry joining a non-LEAF one loses the hint: invalidating more is always allowed), and
//! each run is flushed as the fewest aligned blocks that are exactly its pages, so a
//! batch of neighbouring pages costs what one range does, and no page outside the
//! entries' blocks is invalidated.

use vsva_vtd::regs::{Cap, Ecap};
use vsva_vtd::{addr::DomainId, addr::Pasid, addr::SourceId, inv_desc::InvDesc};
use vsva_vtd_driver::inv::{dev_iotlb_pf, pfsid, piotlb_pages, piotlb_pasid};
use vsva_vtd_driver::mask::{aligned_blocks, covering_block, PAGE_SHIFT, WHOLE_SPACE};

/// Pages to invalidate: `[start, last]` (byte addresses, page-aligned ends), and whether
/// only leaf entries changed (the invalidation hint).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    start: u64,
    last: u64,
    leaf: bool,
}

/// The ranges of an invalidation array's entries, coalesced as they are added.
#[derive(Debug, Default)]
pub struct Invalidation {
    /// Runs closed by an entry that did not join them.
    closed: Vec<Run>,
    open: Option<Run>,
    /// An entry named every address.
    all: bool,
}

/// Most runs room is made for ahead of an array ([`Invalidation::with_capacity`]): the
/// entry count comes from the user.
const RUNS_RESERVED: u32 = 256;

impl Invalidation {
    /// Room for the runs of an array of `entries` entries (up to [`RUNS_RESERVED`]), so
    /// that adding them does not grow the list entry by entry.
    pub fn with_capacity(entries: u32) -> Self {
        Invalidation {
            closed: Vec::with_capacity(entries.min(RUNS_RESERVED) as usize),
            ..Invalidation::default()
        }
    }

    /// Adds an entry's `npages` 4-KiB pages from `addr` (4-KiB aligned; `npages ==
    /// u64::MAX` only with `addr == 0`: everything). Zero pages add nothing.
    pub fn add(&mut self, addr: u64, npages: u64, leaf: bool) {
        if npages == 0 || self.all {
            return;
        }
        if npages == u64::MAX {
            self.all = true;
            return;
        }
        let page = (1u64 << PAGE_SHIFT) - 1;
        let (start, last) = if npages == 1 && addr & page == 0 {
            // One aligned page is its own block (what a scattered array is made of).
            (addr, addr | page)
        } else {
            let last = npages
                .checked_mul(1 << PAGE_SHIFT)
                .and_then(|b| addr.checked_add(b - 1))
                .unwrap_or(u64::MAX);
            let (start, order) = covering_block(addr, last);
            match 1u64.checked_shl(PAGE_SHIFT + u32::from(order)) {
                Some(size) => (start, start + (size - 1)),
                None => (start, u64::MAX),
            }
        };
        let run = Run { start, last, leaf };
        match &mut self.open {
            Some(o)
                if run.start <= o.last.saturating_add(1)
                    && o.start <= run.last.saturating_add(1) =>
            {
                o.start = o.start.min(run.start);
                o.last = o.last.max(run.last);
                o.leaf &= run.leaf;
            }
            open => {
                if let Some(done) = open.replace(run) {
                    self.closed.push(done);
                }
            }
        }
    }

    /// Appends to `descs` the descriptors that carry the invalidation out at each of
    /// `targets` (device, PASID) of domain `did`: a PASID-based IOTLB invalidation and a
    /// PASID-based device-TLB invalidation of each block, or PASID-selective ones when an
    /// entry named everything.
    pub fn descriptors(
        &self,
        did: DomainId,
        targets: &[(SourceId, Pasid)],
        cap: &Cap,
        ecap: &Ecap,
        descs: &mut Vec<InvDesc>,
    ) {
        // Two descriptors for each run and target at least (more when a run is several
        // blocks).
        let runs = if self.all {
            1
        } else {
            self.closed.len() + usize::from(self.open.is_some())
        };
        descs.reserve(2 * runs * targets.len());
        for &(sid, pasid) in targets {
            let pf = pfsid(sid, ecap);
            if self.all {
                descs.push(piotlb_pasid(did, pasid));
                descs.push(dev_iotlb_pf(sid, pf, Some(pasid), 0, WHOLE_SPACE));
                continue;
            }
            for (base, order, leaf) in self.blocks() {
                descs.push(piotlb_pages(did, pasid, base, order, leaf, cap));
                descs.push(dev_iotlb_pf(sid, pf, Some(pasid), base, order));
            }
        }
    }

    /// The aligned blocks (address, order, leaf hint) of every run, unless an entry named
    /// everything.
    fn blocks(&self) -> impl Iterator<Item = (u64, u8, bool)> + '_ {
        self.closed
            .iter()
            .chain(&self.open)
            .filter(|_| !self.all)
            .flat_map(|r| aligned_blocks(r.start, r.last).map(|(b, o)| (b, o, r.leaf)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const PAGE: u64 = 1 << PAGE_SHIFT;

    fn pages(blocks: impl Iterator<Item = (u64, u8, bool)>) -> Vec<(u64, bool)> {
        let mut v: Vec<_> = blocks
            .flat_map(|(b, o, leaf)| (0..1u64 << o).map(move |i| (b / PAGE + i, leaf)))
            .collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn neighbouring_pages_are_one_block() {
        let mut inv = Invalidation::default();
        for i in 0..64 {
            inv.add(0x4000_0000 + i * PAGE, 1, true);
        }
        assert_eq!(
            inv.blocks().collect::<Vec<_>>(),
            vec![(0x4000_0000, 6, true)]
        );
    }

    #[test]
    fn ranges_take_their_covering_block_and_leaf_is_lost_by_joining() {
        let mut inv = Invalidation::default();
        // Pages 1..=2 cover the aligned block 0..=3 (as Linux's PSI mask does).
        inv.add(PAGE, 2, true);
        inv.add(4 * PAGE, 1, false);
        inv.add(100 * PAGE, 1, true);
        assert_eq!(
            inv.blocks().collect::<Vec<_>>(),
            vec![(0, 2, false), (4 * PAGE, 0, false), (100 * PAGE, 0, true)]
        );
        inv.add(0, u64::MAX, true);
        assert_eq!(inv.blocks().count(), 0);
        assert!(inv.all);
        inv.add(PAGE, 1, true);
        assert_eq!(inv.blocks().count(), 0);
    }

    proptest! {
        /// The blocks are exactly the pages of the entries' covering blocks, each page
        /// with the leaf hint only if every entry that covers it and joined its run had
        /// it, and never more blocks than entries.
        #[test]
        fn blocks_are_exactly_the_entries_blocks(
            entries in proptest::collection::vec((0u64..256, 0u64..20, any::<bool>()), 0..40)
        ) {
            let mut inv = Invalidation::default();
            let mut want = BTreeSet::new();
            for &(page, n, leaf) in &entries {
                inv.add(page * PAGE, n, leaf);
                if n > 0 {
                    let last = (page + n) * PAGE - 1;
                    let (b, o) = covering_block(page * PAGE, last);
                    want.extend((0..1u64 << o).map(|i| b / PAGE + i));
                }
            }
            let got = pages(inv.blocks());
            let set: BTreeSet<u64> = got.iter().map(|&(p, _)| p).collect();
            prop_assert_eq!(&set, &want);
            prop_assert!(inv.blocks().count() <= entries.len());
            // A page an entry without the hint covers is never flushed with the hint.
            for &(page, n, leaf) in &entries {
                if n > 0 && !leaf {
                    let (b, o) = covering_block(page * PAGE, (page + n) * PAGE - 1);
                    for p in b / PAGE..b / PAGE + (1 << o) {
                        prop_assert!(got.iter().filter(|&&(q, _)| q == p).any(|&(_, l)| !l));
                    }
                }
            }
        }
    }
}
