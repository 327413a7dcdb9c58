//! The live PASID sets, found by id without hashing: a table of at most [`MAX_SETS`]
//! slots, where a set's id is its slot (low 16 bits) and how many sets the slot held
//! before it (high 16 bits).
//!
//! The owner table names a PASID's set by its 16-bit slot (see the `owners` module), so
//! that an owner entry takes two bytes. A destroyed set's slot goes to the next set
//! created, under a new id: an id is not handed out again until its slot has been reused
//! 65,536 times. Slots are added as sets are created and kept (20 bytes each) at the peak
//! number of live sets.

use super::{PasidSetId, NO_OWNER};

/// The most sets live at once: every 16-bit slot but [`NO_OWNER`].
pub(super) const MAX_SETS: usize = NO_OWNER as usize;

/// One set: its id, its quota and how many PASIDs it holds (which ones, the allocator's
/// owner table says).
#[derive(Clone, Debug)]
pub(super) struct PasidSet {
    pub(super) id: PasidSetId,
    pub(super) quota: u32,
    pub(super) held: u32,
}

impl PasidSet {
    /// The set's slot: how the owner table names it.
    pub(super) fn slot(&self) -> u16 {
        slot_of(self.id)
    }
}

fn slot_of(id: PasidSetId) -> u16 {
    id.raw() as u16
}

/// A slot: the set in it, if any, and the id its next set gets.
#[derive(Clone, Debug)]
struct Slot {
    set: Option<PasidSet>,
    next_id: PasidSetId,
}

/// The table of live sets.
#[derive(Clone, Debug, Default)]
pub(super) struct SetTable {
    slots: Vec<Slot>,
    /// Vacant slots, the last vacated on top.
    vacant: Vec<u16>,
}

impl SetTable {
    /// An empty table whose first set gets id 0.
    pub(super) fn new() -> Self {
        Self::default()
    }

    /// The set with id `id`, if it is live.
    pub(super) fn get(&self, id: PasidSetId) -> Option<&PasidSet> {
        let slot = self.slots.get(usize::from(slot_of(id)))?;
        slot.set.as_ref().filter(|set| set.id == id)
    }

    /// The set with id `id`, if it is live.
    pub(super) fn get_mut(&mut self, id: PasidSetId) -> Option<&mut PasidSet> {
        let slot = self.slots.get_mut(usize::from(slot_of(id)))?;
        slot.set.as_mut().filter(|set| set.id == id)
    }

    /// The id of the set in `slot`, if one is live there.
    pub(super) fn id_at(&self, slot: u16) -> Option<PasidSetId> {
        Some(self.slots.get(usize::from(slot))?.set.as_ref()?.id)
    }

    /// Creates an empty set with `quota` and returns its id; `None` when [`MAX_SETS`] are
    /// live.
    pub(super) fn create(&mut self, quota: u32) -> Option<PasidSetId> {
        let at = match self.vacant.pop() {
            Some(at) => usize::from(at),
            None if self.slots.len() < MAX_SETS => {
                let at = self.slots.len();
                self.slots.push(Slot {
                    set: None,
                    next_id: PasidSetId(at as u32),
                });
                at
            }
            None => return None,
        };
        let slot = &mut self.slots[at];
        let id = slot.next_id;
        slot.set = Some(PasidSet { id, quota, held: 0 });
        Some(id)
    }

    /// Removes the set with id `id` and returns it, if it is live.
    pub(super) fn remove(&mut self, id: PasidSetId) -> Option<PasidSet> {
        let at = slot_of(id);
        let slot = self.slots.get_mut(usize::from(at))?;
        let set = slot.set.take_if(|set| set.id == id)?;
        slot.next_id = PasidSetId(id.raw().wrapping_add(1 << 16));
        self.vacant.push(at);
        Some(set)
    }

    /// The live sets, in no particular order.
    #[cfg(test)]
    pub(super) fn iter(&self) -> impl Iterator<Item = &PasidSet> {
        self.slots.iter().filter_map(|slot| slot.set.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[test]
    fn ids_count_up_from_zero() {
        let mut t = SetTable::new();
        let ids: Vec<_> = (0..100).map(|q| t.create(q).unwrap()).collect();
        assert_eq!(ids, (0..100).map(PasidSetId).collect::<Vec<_>>());
        for (q, &id) in ids.iter().enumerate() {
            assert_eq!(t.get(id).map(|s| s.quota), Some(q as u32));
            assert_eq!(t.id_at(q as u16), Some(id));
        }
        assert!(t.get(PasidSetId(100)).is_none());
        assert!(t.get(PasidSetId(1 << 16)).is_none());
        assert_eq!(t.id_at(100), None);
    }

    #[test]
    fn a_reused_slot_gets_a_new_id() {
        let mut t = SetTable::new();
        let a = t.create(1).unwrap();
        let b = t.create(2).unwrap();
        assert_eq!(t.remove(a).map(|s| s.quota), Some(1));
        assert!(t.remove(a).is_none());
        assert!(t.get(a).is_none() && t.get_mut(a).is_none());
        assert_eq!(t.id_at(0), None);
        let c = t.create(3).unwrap();
        assert_eq!(c, PasidSetId(1 << 16));
        assert_eq!((slot_of(c), t.id_at(0)), (0, Some(c)));
        assert!(t.get(a).is_none());
        assert_eq!(t.get(b).map(|s| s.quota), Some(2));
        assert_eq!(t.iter().count(), 2);
    }

    #[test]
    fn at_most_max_sets_live() {
        let mut t = SetTable::new();
        let ids: Vec<_> = (0..MAX_SETS).map(|_| t.create(1).unwrap()).collect();
        assert_eq!(t.create(1), None);
        assert_eq!(t.slots.len(), MAX_SETS);
        assert!(ids.iter().all(|&id| slot_of(id) != NO_OWNER));
        t.remove(ids[4000]).unwrap();
        let again = t.create(1).unwrap();
        assert_eq!(slot_of(again), 4000);
        assert_ne!(again, ids[4000]);
        assert_eq!(t.create(1), None);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Create(u32),
        Remove(usize),
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Against a map of live sets: no two sets ever get the same id, every live set is
        /// found under its id and its slot with its quota, a removed id is not found again,
        /// and no slot is added while one is vacant.
        #[test]
        fn agrees_with_model(
            ops in proptest::collection::vec(
                prop_oneof![3 => any::<u32>().prop_map(Op::Create), 2 => (0usize..64).prop_map(Op::Remove)],
                1..200,
            ),
        ) {
            let mut t = SetTable::new();
            let mut issued: Vec<PasidSetId> = Vec::new();
            let mut live: BTreeMap<PasidSetId, u32> = BTreeMap::new();
            let mut peak = 0;
            for op in ops {
                match op {
                    Op::Create(quota) => {
                        let id = t.create(quota).unwrap();
                        prop_assert!(!issued.contains(&id));
                        live.insert(id, quota);
                        issued.push(id);
                    }
                    Op::Remove(i) => {
                        let Some(&id) = issued.get(i) else { continue };
                        let removed = t.remove(id).map(|s| (s.id, s.quota));
                        prop_assert_eq!(removed, live.remove(&id).map(|q| (id, q)));
                    }
                }
                peak = peak.max(live.len());
                prop_assert_eq!(t.iter().count(), live.len());
                prop_assert_eq!(t.slots.len(), peak);
                for &id in &issued {
                    let found = live.get(&id).map(|&q| (id, q));
                    prop_assert_eq!(t.get(id).map(|s| (s.id, s.quota)), found);
                    if found.is_some() {
                        prop_assert_eq!(t.id_at(slot_of(id)), Some(id));
                    }
                }
            }
        }
    }
}
