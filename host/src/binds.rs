//! The guest PASID binds (`iommu_gpasid_bind_data`) a container or a domain keeps, by host
//! PASID: one vector sorted by PASID, found by binary search. The vector grows by a
//! quarter at a time and gives room back once half of it is unused (keeping room for four),
//! so a bind costs its 40 bytes and at most a quarter more after growing (half more after
//! removals), where a B-tree map spends about 85 bytes a bind on keys, links and
//! half-empty nodes.

use vsva_vtd::addr::Pasid;

use vsva_uapi::request::BindGpasid;

/// The room a vector of binds is given first and keeps when it shrinks.
const MIN_ROOM: usize = 4;

/// Binds sorted by host PASID, at most one per PASID.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct GpasidBinds {
    binds: Vec<BindGpasid>,
}

impl GpasidBinds {
    fn position(&self, pasid: Pasid) -> Result<usize, usize> {
        self.binds.binary_search_by_key(&pasid, |b| b.hpasid)
    }

    /// Whether `pasid` is bound.
    pub fn contains(&self, pasid: Pasid) -> bool {
        self.position(pasid).is_ok()
    }

    /// Adds `bind`; false, and nothing changes, if its host PASID is bound already.
    pub fn insert(&mut self, bind: BindGpasid) -> bool {
        match self.position(bind.hpasid) {
            Ok(_) => false,
            Err(i) => {
                if self.binds.len() == self.binds.capacity() {
                    self.binds
                        .reserve_exact((self.binds.len() / 4).max(MIN_ROOM));
                }
                self.binds.insert(i, bind);
                true
            }
        }
    }

    /// Removes and returns the bind of `pasid`. Once less than half of the room is in use
    /// the vector keeps only a quarter more than it holds, so a shrinking table does not
    /// keep its peak size; but never less than [`MIN_ROOM`] binds, so that a bind and its
    /// unbind at a few binds do not reallocate twice each.
    pub fn remove(&mut self, pasid: Pasid) -> Option<BindGpasid> {
        let bind = self.binds.remove(self.position(pasid).ok()?);
        let len = self.binds.len();
        if 2 * len < self.binds.capacity() && self.binds.capacity() > MIN_ROOM {
            self.binds.shrink_to((len + len / 4).max(MIN_ROOM));
        }
        Some(bind)
    }

    /// The binds in host PASID order.
    pub fn iter(&self) -> std::slice::Iter<'_, BindGpasid> {
        self.binds.iter()
    }

    /// The bound host PASIDs in order.
    pub fn pasids(&self) -> impl Iterator<Item = Pasid> + '_ {
        self.binds.iter().map(|b| b.hpasid)
    }

    /// Whether nothing is bound.
    pub fn is_empty(&self) -> bool {
        self.binds.is_empty()
    }
}

impl IntoIterator for GpasidBinds {
    type Item = BindGpasid;
    type IntoIter = std::vec::IntoIter<BindGpasid>;

    fn into_iter(self) -> Self::IntoIter {
        self.binds.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use vsva_vtd::addr::Gpa;

    use super::*;

    fn bind(pasid: u32, gpgd: u64) -> BindGpasid {
        BindGpasid {
            hpasid: Pasid::new(pasid).unwrap(),
            gpasid: None,
            gpgd: Gpa(gpgd << 12),
            addr_width: 48,
            vtd_flags: 0,
            pat: 0,
            emt: 0,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Inserts (of new and of bound PASIDs) and removes (of bound and unbound ones)
        /// keep the binds exactly those of a map by PASID, in PASID order; the room kept
        /// is never more than twice what is in use, beyond a small start.
        #[test]
        fn binds_agree_with_a_map(ops in prop::collection::vec((any::<bool>(), 0u32..48, 0u64..4), 1..300)) {
            let mut binds = GpasidBinds::default();
            let mut model = BTreeMap::new();
            for (insert, p, gpgd) in ops {
                let pasid = Pasid::new(p).unwrap();
                if insert {
                    let b = bind(p, gpgd);
                    let fresh = !model.contains_key(&pasid);
                    prop_assert_eq!(binds.insert(b), fresh);
                    if fresh {
                        model.insert(pasid, b);
                    }
                } else {
                    prop_assert_eq!(binds.remove(pasid), model.remove(&pasid));
                }
                prop_assert_eq!(binds.contains(pasid), model.contains_key(&pasid));
                prop_assert!(binds.iter().eq(model.values()));
                prop_assert!(binds.pasids().eq(model.keys().copied()));
                prop_assert_eq!(binds.is_empty(), model.is_empty());
                prop_assert!(binds.binds.capacity() <= (2 * binds.binds.len()).max(8));
            }
            prop_assert!(binds.into_iter().eq(model.into_values()));
        }
    }

    /// A bind and its unbind next to a few others keep the vector's room as it was.
    #[test]
    fn bind_and_unbind_at_a_few_binds_keep_the_room() {
        let mut binds = GpasidBinds::default();
        assert!(binds.insert(bind(1, 0)));
        let room = binds.binds.capacity();
        for p in 2..4 {
            assert!(binds.insert(bind(p, 0)));
            assert!(binds.remove(Pasid::new(p).unwrap()).is_some());
            assert_eq!(binds.binds.capacity(), room);
        }
    }
}
