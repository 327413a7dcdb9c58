//! The live PASID sets, found by id without hashing: a direct-mapped table whose length is
//! a power of two, where the set with id `i` sits in slot `i mod len`.
//!
//! New ids count up from the last one handed out, skipping the free marker and any id whose
//! slot is taken, so an id is never shared by two live sets and a destroyed set's id is not
//! handed out again until the 32-bit count wraps. The table doubles before it is half full;
//! ids that differ modulo a length also differ modulo its double, so growing never moves
//! two sets into one slot. It never shrinks: 16 bytes a slot, at most four slots per set at
//! the peak number of live sets.

use super::{PasidSetId, NO_OWNER};

/// Slots of a new table.
const MIN_SLOTS: usize = 8;

/// One set: its id, its quota and how many PASIDs it holds (which ones, the allocator's
/// owner table says).
#[derive(Clone, Debug)]
pub(super) struct PasidSet {
    pub(super) id: PasidSetId,
    pub(super) quota: u32,
    pub(super) held: u32,
}

/// The table of live sets.
#[derive(Clone, Debug)]
pub(super) struct SetTable {
    /// A power-of-two number of slots, at most half of them full.
    slots: Vec<Option<PasidSet>>,
    live: usize,
    next_id: u32,
}

impl SetTable {
    /// An empty table whose first set gets id 0.
    pub(super) fn new() -> Self {
        Self::starting_at(0)
    }

    /// An empty table whose first set gets `next_id` (or the next usable id).
    pub(super) fn starting_at(next_id: u32) -> Self {
        SetTable {
            slots: vec![None; MIN_SLOTS],
            live: 0,
            next_id,
        }
    }

    fn slot(&self, id: PasidSetId) -> usize {
        id.raw() as usize & (self.slots.len() - 1)
    }

    /// The set with id `id`, if it is live.
    pub(super) fn get(&self, id: PasidSetId) -> Option<&PasidSet> {
        self.slots[self.slot(id)].as_ref().filter(|s| s.id == id)
    }

    /// The set with id `id`, if it is live.
    pub(super) fn get_mut(&mut self, id: PasidSetId) -> Option<&mut PasidSet> {
        let slot = self.slot(id);
        self.slots[slot].as_mut().filter(|s| s.id == id)
    }

    /// Creates an empty set with `quota` and returns its id.
    pub(super) fn create(&mut self, quota: u32) -> PasidSetId {
        if 2 * (self.live + 1) > self.slots.len() {
            self.grow();
        }
        // At least half the slots are free, and consecutive ids visit every slot.
        let id = loop {
            let id = PasidSetId(self.next_id);
            self.next_id = self.next_id.wrapping_add(1);
            if id.raw() != NO_OWNER && self.slots[self.slot(id)].is_none() {
                break id;
            }
        };
        let slot = self.slot(id);
        self.slots[slot] = Some(PasidSet { id, quota, held: 0 });
        self.live += 1;
        id
    }

    /// Removes the set with id `id` and returns it, if it is live.
    pub(super) fn remove(&mut self, id: PasidSetId) -> Option<PasidSet> {
        let slot = self.slot(id);
        let set = self.slots[slot].take_if(|s| s.id == id)?;
        self.live -= 1;
        Some(set)
    }

    /// The live sets, in no particular order.
    #[cfg(test)]
    pub(super) fn iter(&self) -> impl Iterator<Item = &PasidSet> {
        self.slots.iter().flatten()
    }

    /// Doubles the table, moving each set to its slot in the new length.
    fn grow(&mut self) {
        let len = self.slots.len() * 2;
        let mut slots = vec![None; len];
        for set in self.slots.drain(..).flatten() {
            let slot = set.id.raw() as usize & (len - 1);
            slots[slot] = Some(set);
        }
        self.slots = slots;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[test]
    fn ids_count_up_and_survive_growth() {
        let mut t = SetTable::new();
        let ids: Vec<_> = (0..100).map(|q| t.create(q)).collect();
        assert_eq!(ids, (0..100).map(PasidSetId).collect::<Vec<_>>());
        assert_eq!(t.slots.len(), 256);
        for (q, &id) in ids.iter().enumerate() {
            assert_eq!(t.get(id).map(|s| s.quota), Some(q as u32));
        }
        assert!(t.get(PasidSetId(100)).is_none());
        assert!(t.get(PasidSetId(256)).is_none());
    }

    #[test]
    fn an_id_whose_slot_is_taken_is_skipped() {
        let mut t = SetTable::new();
        let first = t.create(1);
        for _ in 0..7 {
            let id = t.create(1);
            assert!(t.remove(id).is_some());
        }
        // Ids 8.. map to slots 0.. again (8 slots); slot 0 still holds set 0.
        assert_eq!(t.slots.len(), 8);
        assert_eq!(t.create(1), PasidSetId(9));
        assert_eq!(t.get(first).map(|s| s.id), Some(first));
        assert!(t.get(PasidSetId(8)).is_none());
    }

    #[test]
    fn a_removed_id_is_gone() {
        let mut t = SetTable::new();
        let a = t.create(1);
        let b = t.create(2);
        assert_eq!(t.remove(a).map(|s| s.quota), Some(1));
        assert!(t.remove(a).is_none());
        assert!(t.get(a).is_none());
        assert_eq!(t.get(b).map(|s| s.quota), Some(2));
        assert!(t.get_mut(a).is_none());
        assert_eq!(t.iter().count(), 1);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Create(u32),
        Remove(usize),
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Against a map of live sets: ids are never the free marker nor shared by two live
        /// sets, every live set is found under its id and with its quota, and a removed id
        /// is not found until it is handed out again.
        #[test]
        fn agrees_with_model(
            start in prop_oneof![Just(0u32), Just(NO_OWNER - 20), any::<u32>()],
            ops in proptest::collection::vec(
                prop_oneof![3 => any::<u32>().prop_map(Op::Create), 2 => (0usize..64).prop_map(Op::Remove)],
                1..200,
            ),
        ) {
            let mut t = SetTable::starting_at(start);
            let mut issued: Vec<PasidSetId> = Vec::new();
            let mut live: BTreeMap<PasidSetId, u32> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Create(quota) => {
                        let id = t.create(quota);
                        prop_assert_ne!(id.raw(), NO_OWNER);
                        prop_assert!(live.insert(id, quota).is_none());
                        issued.push(id);
                    }
                    Op::Remove(i) => {
                        let Some(&id) = issued.get(i) else { continue };
                        let removed = t.remove(id).map(|s| (s.id, s.quota));
                        prop_assert_eq!(removed, live.remove(&id).map(|q| (id, q)));
                    }
                }
                prop_assert_eq!(t.iter().count(), live.len());
                prop_assert!(2 * live.len() <= t.slots.len());
                for &id in &issued {
                    prop_assert_eq!(t.get(id).map(|s| (s.id, s.quota)), live.get(&id).map(|&q| (id, q)));
                }
            }
        }
    }
}
