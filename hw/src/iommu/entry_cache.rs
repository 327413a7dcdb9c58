//! The context cache and the PASID cache (VT-d §6.2.1, §6.2.2): scalable-mode context
//! entries by requester id, PASID-table entries by requester id and PASID, kept until a
//! context-cache or PASID-cache invalidation descriptor removes them (§6.5.2.1, §6.5.2.2).
//!
//! Both are sequence-locked set-associative tables ([`SeqSets`]) holding the entries' own
//! qwords, so that a lookup writes nothing and takes no lock; an entry is decoded again on
//! each hit. A fill that began before an invalidation (of either cache: a PASID entry is
//! read through a context entry) is refused.

use vsva_vtd::{addr::DomainId, context::ScalableContextEntry, pasid::PasidEntry};

use super::seqset::{Generation, SeqSets};
use crate::sync::Ordering;

/// Sets of the context cache (4 ways each): requester ids 0 to 1023 each have a way.
const CONTEXT_SETS: usize = 256;
/// Sets of the PASID cache (3 ways each).
const PASID_SETS: usize = 1024;
/// Ways per set of the context cache.
const CONTEXT_WAYS: usize = 4;
/// Ways per set of the PASID cache.
const PASID_WAYS: usize = 3;

/// Tag bits: requester id in 15:0, PASID in 35:16, valid in 63.
const VALID: u64 = 1 << 63;
const PASID_SHIFT: u32 = 16;

fn context_tag(rid: u16) -> u64 {
    VALID | rid as u64
}

fn pasid_tag(rid: u16, pasid: u32) -> u64 {
    VALID | rid as u64 | (pasid as u64) << PASID_SHIFT
}

/// The set of a requester id: the functions of a device share one, a way each.
fn context_set(rid: u16, mask: usize) -> usize {
    ((rid >> 2) as usize ^ ((rid >> 10) as usize * 0x55)) & mask
}

/// The set of a PASID of a requester: consecutive PASIDs of one requester in consecutive
/// sets, requesters spread apart.
fn pasid_set(rid: u16, pasid: u32, mask: usize) -> usize {
    (pasid as usize ^ (rid as usize).wrapping_mul(0x9e37)) & mask
}

/// The context cache and the PASID cache of one IOMMU.
#[derive(Debug)]
pub(crate) struct EntryCaches {
    /// Tag, and qwords 0 and 1 of the context entry (2 and 3 are reserved).
    contexts: SeqSets<3, CONTEXT_WAYS>,
    /// Tag, and qwords 0 to 2 of the PASID entry (3 to 7 are reserved).
    pasids: SeqSets<4, PASID_WAYS>,
    /// Counts context- and PASID-cache invalidations.
    generation: Generation,
}

impl Default for EntryCaches {
    fn default() -> Self {
        EntryCaches {
            contexts: SeqSets::new(CONTEXT_SETS),
            pasids: SeqSets::new(PASID_SETS),
            generation: Generation::default(),
        }
    }
}

impl EntryCaches {
    /// The token of a fill whose entry is read from now on.
    pub(crate) fn begin_fill(&self) -> u64 {
        self.generation.begin()
    }

    /// The cached context entry of `rid`.
    pub(crate) fn context(&self, rid: u16) -> Option<ScalableContextEntry> {
        let tag = context_tag(rid);
        let set = context_set(rid, self.contexts.mask());
        let [q0, q1] = self.contexts.find(set, rid as usize, |w| {
            (w[0].load(Ordering::Relaxed) == tag)
                .then(|| [1, 2].map(|i| w[i].load(Ordering::Relaxed)))
        })?;
        ScalableContextEntry::from_raw([q0, q1, 0, 0]).ok()
    }

    /// Caches `ctx` for `rid` unless an invalidation ran since `fill`.
    pub(crate) fn fill_context(&self, fill: u64, rid: u16, ctx: &ScalableContextEntry) {
        let tag = context_tag(rid);
        let [q0, q1, _, _] = ctx.to_raw();
        self.contexts.fill(
            &self.generation,
            fill,
            context_set(rid, self.contexts.mask()),
            rid as usize,
            |w| w[0].load(Ordering::Relaxed) == tag,
            [tag, q0, q1],
        );
    }

    /// The cached PASID entry of `pasid` for `rid`.
    pub(crate) fn pasid_entry(&self, rid: u16, pasid: u32) -> Option<PasidEntry> {
        let tag = pasid_tag(rid, pasid);
        let set = pasid_set(rid, pasid, self.pasids.mask());
        let [q0, q1, q2] = self.pasids.find(set, 0, |w| {
            (w[0].load(Ordering::Relaxed) == tag)
                .then(|| [1, 2, 3].map(|i| w[i].load(Ordering::Relaxed)))
        })?;
        PasidEntry::from_raw([q0, q1, q2, 0, 0, 0, 0, 0]).ok()
    }

    /// Caches `pe` for `rid` and `pasid` unless an invalidation ran since `fill`.
    pub(crate) fn fill_pasid_entry(&self, fill: u64, rid: u16, pasid: u32, pe: &PasidEntry) {
        let tag = pasid_tag(rid, pasid);
        let [q0, q1, q2, ..] = pe.to_raw();
        self.pasids.fill(
            &self.generation,
            fill,
            pasid_set(rid, pasid, self.pasids.mask()),
            0,
            |w| w[0].load(Ordering::Relaxed) == tag,
            [tag, q0, q1, q2],
        );
    }

    /// Removes the context entries of the requester ids `covers` accepts.
    pub(crate) fn invalidate_contexts(&self, covers: impl Fn(u16) -> bool) {
        self.generation.advance();
        for set in self.contexts.occupied() {
            let w = self.contexts.write(set);
            for way in 0..CONTEXT_WAYS {
                let tag = w.tag(way);
                if tag != 0 && covers(tag as u16) {
                    w.clear(way);
                }
            }
        }
    }

    /// Removes the PASID entries whose PASID and domain id `select` accepts.
    pub(crate) fn invalidate_pasid_entries(&self, select: impl Fn(u32, DomainId) -> bool) {
        self.generation.advance();
        for set in self.pasids.occupied() {
            let w = self.pasids.write(set);
            for way in 0..PASID_WAYS {
                let tag = w.tag(way);
                let pasid = (tag >> PASID_SHIFT) as u32 & 0xf_ffff;
                // The domain id is qword 1's bits 15:0 (§9.6).
                let did = DomainId(w.word(way, 2) as u16);
                if tag != 0 && select(pasid, did) {
                    w.clear(way);
                }
            }
        }
    }

    /// How many context and PASID entries are cached.
    pub(crate) fn len(&self) -> (usize, usize) {
        (self.contexts.len(), self.pasids.len())
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use vsva_vtd::addr::Pasid;
    use vsva_vtd::pasid::Pgtt;

    fn context(dir: u64, pre: bool) -> ScalableContextEntry {
        ScalableContextEntry {
            fpd: false,
            dte: true,
            paside: true,
            pre,
            pdts: 3,
            pasiddirptr: dir << 12,
            rid_pasid: Pasid::new(0).unwrap(),
            rid_priv: false,
        }
    }

    fn pasid_entry(did: u16, table: u64) -> PasidEntry {
        PasidEntry {
            slptptr: table << 12,
            flptptr: (table + 1) << 12,
            nxe: true,
            ..PasidEntry::new(Pgtt::Nested, DomainId(did))
        }
    }

    /// A context-cache invalidation: the requester ids it covers.
    #[derive(Clone, Debug)]
    enum ContextInv {
        All,
        Rid(u16),
        Bus(u8),
    }

    impl ContextInv {
        fn covers(&self, rid: u16) -> bool {
            match *self {
                ContextInv::All => true,
                ContextInv::Rid(r) => r == rid,
                ContextInv::Bus(b) => rid >> 8 == b as u16,
            }
        }
    }

    /// A PASID-cache invalidation (§6.5.2.2): global, domain- or PASID-selective.
    #[derive(Clone, Debug)]
    enum PasidInv {
        All,
        Domain(u16),
        Pasid(u16, u32),
    }

    impl PasidInv {
        fn covers(&self, pasid: u32, did: DomainId) -> bool {
            match *self {
                PasidInv::All => true,
                PasidInv::Domain(d) => did.0 == d,
                PasidInv::Pasid(d, p) => did.0 == d && pasid == p,
            }
        }
    }

    fn context_inv() -> impl Strategy<Value = ContextInv> {
        prop_oneof![
            Just(ContextInv::All),
            (0u16..8).prop_map(|r| ContextInv::Rid(r * 0x101)),
            (0u8..8).prop_map(ContextInv::Bus),
        ]
    }

    fn pasid_inv() -> impl Strategy<Value = PasidInv> {
        prop_oneof![
            Just(PasidInv::All),
            (1u16..4).prop_map(PasidInv::Domain),
            (1u16..4, 0u32..8).prop_map(|(d, p)| PasidInv::Pasid(d, p)),
        ]
    }

    #[test]
    fn a_fill_that_began_before_an_invalidation_is_refused() {
        let c = EntryCaches::default();
        let fill = c.begin_fill();
        c.invalidate_pasid_entries(|_, _| false);
        c.fill_context(fill, 7, &context(5, true));
        c.fill_pasid_entry(fill, 7, 3, &pasid_entry(1, 9));
        assert_eq!(c.len(), (0, 0));
        let fill = c.begin_fill();
        c.fill_context(fill, 7, &context(5, true));
        c.fill_pasid_entry(fill, 7, 3, &pasid_entry(1, 9));
        assert_eq!(c.context(7), Some(context(5, true)));
        assert_eq!(c.pasid_entry(7, 3), Some(pasid_entry(1, 9)));
        assert_eq!(c.pasid_entry(7, 4), None);
        assert_eq!(c.pasid_entry(8, 3), None);
        assert_eq!(c.len(), (1, 1));
    }

    proptest! {
        /// A lookup after a fill returns the entry filled, and after any invalidation
        /// that covers it never; an invalidation that does not cover an entry keeps it
        /// unless a later fill replaced it in its full set.
        #[test]
        fn lookups_see_fills_until_a_covering_invalidation(
            contexts in proptest::collection::vec((0u16..8, 0u64..4, any::<bool>()), 1..40),
            pasids in proptest::collection::vec((0u16..8, 0u32..8, 1u16..4, 0u64..4), 1..60),
            cinv in context_inv(),
            pinv in pasid_inv(),
        ) {
            let c = EntryCaches::default();
            let mut last_ctx = std::collections::HashMap::new();
            for &(r, dir, pre) in &contexts {
                let (rid, ctx) = (r * 0x101, context(dir, pre));
                c.fill_context(c.begin_fill(), rid, &ctx);
                prop_assert_eq!(c.context(rid), Some(ctx));
                last_ctx.insert(rid, ctx);
            }
            let mut last_pe = std::collections::HashMap::new();
            for &(r, pasid, did, table) in &pasids {
                let pe = pasid_entry(did, table);
                c.fill_pasid_entry(c.begin_fill(), r, pasid, &pe);
                prop_assert_eq!(c.pasid_entry(r, pasid), Some(pe));
                last_pe.insert((r, pasid), pe);
            }
            c.invalidate_contexts(|rid| cinv.covers(rid));
            c.invalidate_pasid_entries(|pasid, did| pinv.covers(pasid, did));
            for (&rid, ctx) in &last_ctx {
                let now = c.context(rid);
                if cinv.covers(rid) {
                    prop_assert_eq!(now, None);
                } else {
                    // Eight requester ids, each in a set of its own: nothing was evicted.
                    prop_assert_eq!(now, Some(*ctx));
                }
            }
            for (&(r, pasid), pe) in &last_pe {
                let now = c.pasid_entry(r, pasid);
                if pinv.covers(pasid, pe.did) {
                    prop_assert_eq!(now, None);
                } else if let Some(now) = now {
                    prop_assert_eq!(now, *pe);
                }
            }
        }
    }
}
