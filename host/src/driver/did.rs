//! Domain ids (VT-d §3.6.1): the tag every cached translation carries.
//!
//! As intel-iommu does in scalable mode, ids 0 and 1 are never handed out: 0 is the id
//! that caching-mode hardware uses for not-present entries, and 1 is `FLPT_DEFAULT_DID`.

use std::collections::BTreeSet;

use vsva_vtd::addr::DomainId;

/// Ids below this are reserved.
pub const FIRST_DOMAIN_ID: u16 = 2;

/// Hands out the domain ids CAP_REG.ND allows; the lowest free id first. Allocation and
/// release are O(log n).
#[derive(Clone, Debug)]
pub struct DomainIdAllocator {
    /// One past the largest id: `2^(4 + 2·ND)`.
    limit: u32,
    /// Ids at and above this were never handed out.
    next: u32,
    /// Ids below `next` that were released.
    released: BTreeSet<u16>,
}

impl DomainIdAllocator {
    /// An allocator for a unit that supports `domains` ids (CAP_REG.ND, at most 2^16).
    pub fn new(domains: u32) -> Self {
        DomainIdAllocator {
            limit: domains.min(1 << 16),
            next: FIRST_DOMAIN_ID.into(),
            released: BTreeSet::new(),
        }
    }

    /// The lowest free id, or `None` when every id is in use.
    pub fn alloc(&mut self) -> Option<DomainId> {
        if let Some(id) = self.released.pop_first() {
            return Some(DomainId(id));
        }
        if self.next >= self.limit {
            return None;
        }
        let id = self.next as u16;
        self.next += 1;
        Some(DomainId(id))
    }

    /// Releases an id; `false` (and no change) when it was not allocated.
    pub fn free(&mut self, did: DomainId) -> bool {
        if !self.is_allocated(did) {
            return false;
        }
        if u32::from(did.0) + 1 == self.next {
            self.next -= 1;
            // Keep `next` just above the highest id in use.
            while self.next > u32::from(FIRST_DOMAIN_ID)
                && self.released.remove(&((self.next - 1) as u16))
            {
                self.next -= 1;
            }
        } else {
            self.released.insert(did.0);
        }
        true
    }

    /// Whether `did` is handed out.
    pub fn is_allocated(&self, did: DomainId) -> bool {
        did.0 >= FIRST_DOMAIN_ID && u32::from(did.0) < self.next && !self.released.contains(&did.0)
    }

    /// Number of ids handed out.
    pub fn in_use(&self) -> usize {
        (self.next - u32::from(FIRST_DOMAIN_ID)) as usize - self.released.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reserved_ids_are_never_handed_out_and_the_space_ends() {
        let mut a = DomainIdAllocator::new(16);
        let ids: Vec<u16> = std::iter::from_fn(|| a.alloc()).map(|d| d.0).collect();
        assert_eq!(ids, (2..16).collect::<Vec<_>>());
        assert_eq!(a.in_use(), 14);
        assert!(!a.free(DomainId(0)));
        assert!(!a.free(DomainId(1)));
        assert!(a.free(DomainId(7)));
        assert!(!a.free(DomainId(7)), "double free is refused");
        assert_eq!(a.alloc(), Some(DomainId(7)));
        assert_eq!(a.alloc(), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Against a set model: allocation gives the lowest free id, frees succeed exactly
        /// for allocated ids, and the count agrees.
        #[test]
        fn matches_a_set_model(ops in proptest::collection::vec((any::<bool>(), 0u16..40), 1..200)) {
            let mut a = DomainIdAllocator::new(32);
            let mut model = BTreeSet::new();
            for (alloc, id) in ops {
                if alloc {
                    let want = (FIRST_DOMAIN_ID..32).find(|i| !model.contains(i));
                    let got = a.alloc().map(|d| d.0);
                    prop_assert_eq!(got, want);
                    if let Some(g) = got {
                        model.insert(g);
                    }
                } else {
                    prop_assert_eq!(a.free(DomainId(id)), model.remove(&id));
                }
                prop_assert_eq!(a.in_use(), model.len());
                for i in 0..40u16 {
                    prop_assert_eq!(a.is_allocated(DomainId(i)), model.contains(&i));
                }
            }
        }
    }
}
