//! Who holds each allocated PASID, and where it sits in its set's member list: entries for
//! allocated PASIDs only, so that the table costs bytes per allocated PASID, not per PASID
//! of the space (a direct table of the 2^20 PASIDs took 8 MiB, 800 bytes per PASID at 1 %
//! occupancy).
//!
//! The entries are spread over 256 hash maps by the PASID's top 8 bits (4,096 PASIDs a
//! map), so that a map's growth rehashes at most 4,096 entries: an insertion costs a
//! bounded number of operations whatever the occupancy. Room costs 13 bytes an entry (a
//! 12-byte entry and a control byte). A map filled to n entries has room for at most
//! 2 (n + 1); one whose removals left tombstones may double once more before it rehashes,
//! so a map that has held at most n entries has room for at most 4 (n + 1). A map keeps
//! its room when its PASIDs are freed and gives it back when it empties (unless it is
//! small).

use super::PASID_SPACE;

/// Maps, by the PASID's top bits.
const SHARDS: usize = 256;
/// PASIDs per map.
const SHARD_SPAN: usize = PASID_SPACE / SHARDS;
/// Room an emptied map keeps (at most 56 entries, 1 KiB): a map whose last PASID is freed
/// and another allocated, over and over, does not allocate and free its table each time.
const KEPT_ROOM: usize = 56;

/// An allocated PASID's set and its position in that set's member list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Owner {
    pub(super) set: u32,
    pub(super) index: u32,
}

/// The owners of the allocated PASIDs.
#[derive(Clone, Debug)]
pub(super) struct OwnerTable {
    shards: Box<[foldhash::HashMap<u32, Owner>]>,
}

impl OwnerTable {
    /// A table with no PASID allocated.
    pub(super) fn new() -> Self {
        OwnerTable {
            shards: (0..SHARDS).map(|_| foldhash::HashMap::default()).collect(),
        }
    }

    fn shard(&self, pasid: u32) -> &foldhash::HashMap<u32, Owner> {
        &self.shards[pasid as usize / SHARD_SPAN % SHARDS]
    }

    fn shard_mut(&mut self, pasid: u32) -> &mut foldhash::HashMap<u32, Owner> {
        &mut self.shards[pasid as usize / SHARD_SPAN % SHARDS]
    }

    /// The owner of `pasid`, if it is allocated.
    pub(super) fn get(&self, pasid: u32) -> Option<Owner> {
        self.shard(pasid).get(&pasid).copied()
    }

    /// Records `owner` as the holder of `pasid`.
    pub(super) fn insert(&mut self, pasid: u32, owner: Owner) {
        self.shard_mut(pasid).insert(pasid, owner);
    }

    /// Moves allocated `pasid` to position `index` of its set's member list.
    pub(super) fn set_index(&mut self, pasid: u32, index: u32) {
        if let Some(owner) = self.shard_mut(pasid).get_mut(&pasid) {
            owner.index = index;
        }
    }

    /// Forgets `pasid`'s owner and returns it.
    pub(super) fn remove(&mut self, pasid: u32) -> Option<Owner> {
        let shard = self.shard_mut(pasid);
        let owner = shard.remove(&pasid);
        if shard.is_empty() && shard.capacity() > KEPT_ROOM {
            *shard = foldhash::HashMap::default();
        }
        owner
    }

    /// Number of PASIDs with an owner.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.len()).sum()
    }

    /// Entries the maps have room for without growing.
    #[cfg(test)]
    pub(super) fn capacity(&self) -> usize {
        self.shards.iter().map(|s| s.capacity()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[test]
    fn neighbouring_pasids_share_a_map_and_far_ones_do_not() {
        let t = OwnerTable::new();
        assert!(std::ptr::eq(t.shard(4096), t.shard(8191)));
        assert!(!std::ptr::eq(t.shard(4095), t.shard(4096)));
        assert!(std::ptr::eq(t.shard(0xf_ffff), &t.shards[SHARDS - 1]));
    }

    #[test]
    fn an_emptied_map_gives_its_room_back() {
        let mut t = OwnerTable::new();
        for p in 1..1000 {
            t.insert(p, Owner { set: 1, index: p });
        }
        assert!(t.capacity() >= 999);
        for p in 1..1000 {
            assert_eq!(t.remove(p), Some(Owner { set: 1, index: p }));
        }
        assert_eq!((t.len(), t.capacity()), (0, 0));
        // A small map keeps its room through an allocation and free.
        t.insert(5, Owner { set: 1, index: 0 });
        let room = t.capacity();
        t.remove(5);
        assert_eq!((t.len(), t.capacity()), (0, room));
    }

    #[test]
    fn a_map_filled_without_removals_has_room_for_at_most_twice_its_entries() {
        for n in [1u32, 7, 41, 500, 4095] {
            let mut t = OwnerTable::new();
            for p in 0..n {
                t.insert(p, Owner { set: 0, index: p });
            }
            let room = t.capacity();
            assert!(
                room <= (2 * (n as usize + 1)).max(3),
                "{n} entries, room {room}"
            );
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u32, u32, u32),
        SetIndex(u32, u32),
        Remove(u32),
    }

    /// PASIDs clustered in a few maps (so that maps fill, grow and empty) and spread over
    /// the whole space.
    fn pasid() -> impl Strategy<Value = u32> {
        prop_oneof![0u32..64, 4090u32..4102, 0u32..(PASID_SPACE as u32)]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Against a map of owners: every PASID's owner is the model's, the count agrees,
        /// and each map holds room for at most 4 (n + 1) entries, n the most it held since
        /// it was last empty, or the room an emptied map keeps.
        #[test]
        fn agrees_with_model(ops in proptest::collection::vec(
            prop_oneof![
                3 => (pasid(), any::<u32>(), any::<u32>()).prop_map(|(p, s, i)| Op::Insert(p, s, i)),
                1 => (pasid(), any::<u32>()).prop_map(|(p, i)| Op::SetIndex(p, i)),
                2 => pasid().prop_map(Op::Remove),
            ],
            1..300,
        )) {
            let mut t = OwnerTable::new();
            let mut model: BTreeMap<u32, Owner> = BTreeMap::new();
            let mut peaks = vec![0usize; SHARDS];
            for op in ops {
                match op {
                    Op::Insert(p, set, index) => {
                        t.insert(p, Owner { set, index });
                        model.insert(p, Owner { set, index });
                    }
                    Op::SetIndex(p, index) => {
                        t.set_index(p, index);
                        if let Some(o) = model.get_mut(&p) {
                            o.index = index;
                        }
                    }
                    Op::Remove(p) => prop_assert_eq!(t.remove(p), model.remove(&p)),
                }
                prop_assert_eq!(t.len(), model.len());
                for (&p, &o) in &model {
                    prop_assert_eq!(t.get(p), Some(o));
                }
                for (i, shard) in t.shards.iter().enumerate() {
                    peaks[i] = if shard.is_empty() { 0 } else { peaks[i].max(shard.len()) };
                    prop_assert!(shard.capacity() <= (4 * (peaks[i] + 1)).max(KEPT_ROOM));
                    prop_assert!(!shard.is_empty() || shard.capacity() <= KEPT_ROOM);
                }
            }
            for p in [0, 63, 4095, 4096, 0xf_ffff] {
                prop_assert_eq!(t.get(p), model.get(&p).copied());
            }
        }
    }
}
