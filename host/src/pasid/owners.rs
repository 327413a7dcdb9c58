//! Which PASIDs are allocated (the free bitmap) and who holds each: its set.
//!
//! The owners are kept in leaves of 64 PASIDs, one per word of the bitmap's leaf level,
//! allocated when the first PASID of the word is taken and freed with the last. A leaf
//! holding few PASIDs is packed: the entry of a PASID sits at its rank among the word's
//! taken bits, so that a PASID alone in its 64 costs one 2-byte entry (a direct table of
//! the 2^20 PASIDs would take 2 MiB, 200 bytes per PASID at 1 % occupancy). A leaf holding more
//! than 32 is direct-mapped: the entry sits at the PASID's bit, so that at high occupancy
//! a lookup, insertion or removal touches the one entry and no other. Either way a lookup
//! is the bitmap word with the leaf's place beside it (the bitmap's tag of the word, in the
//! same cache line) and then the entry: no hashing, no probing, no table between, and at
//! 99 % occupancy about 2 MiB of entries where hash maps took 34 MiB.
//!
//! An entry is the owner's set slot (16 bits, see the `sets` module) and nothing else: a set's PASIDs are found by a scan of
//! the taken bits (`OwnerTable::owned_by`), not kept in a per-set list. A list with each
//! PASID's position in it made every free write the list at a random position and every
//! allocation write its set's list end, two more pages per operation out of 1,000 sets'
//! lists; at 99 % occupancy those were two thirds of the pages a churn operation touched.
//!
//! Leaf capacities are powers of two (1 to 64 entries), each capacity's leaves laid end to
//! end in an arena of its own, one array grown by doubling from 2 KiB (1024 one-entry
//! leaves, or 16 full-width ones), so that an entry's address is the arena's base, the
//! leaf's number and the slot, with no block table to read between the place and the
//! entry: a leaf doubles when it is full and halves when it holds a quarter of its room or
//! less, so a leaf of n entries has room for fewer than 4n (8n with the arena's spare
//! room). An arena reuses the leaves freed in it and gives its array back but the first
//! 2 KiB when its last leaf is freed (at most 14 KiB kept over the seven classes).

use vsva_vtd::addr::Pasid;

use super::{bitmap::FreeBitmap, NO_OWNER, PASID_SPACE};

/// PASIDs per leaf: one word of the bitmap.
const LEAF_SPAN: usize = 64;
/// Capacity classes: a leaf of class `c` has room for `1 << c` entries.
const CLASSES: usize = 7;
/// The class of a full-width leaf, direct-mapped by bit.
const DIRECT: usize = CLASSES - 1;
/// Entries an arena makes room for at first and keeps when it empties (2 KiB), whatever
/// its class.
const FIRST_ENTRIES: usize = 1024;

/// An allocated PASID's set, by its slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Owner {
    pub(super) set: u16,
}

/// Where a leaf is: its class (top 8 bits) and its number in that class's arena.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Place(u32);

impl Place {
    fn new(class: usize, leaf: u32) -> Self {
        Place((class as u32) << 24 | leaf)
    }

    fn class(self) -> usize {
        (self.0 >> 24) as usize
    }

    fn leaf(self) -> u32 {
        self.0 & 0x00ff_ffff
    }
}

/// The leaves of one capacity class.
#[derive(Clone, Debug, Default)]
struct Arena {
    /// The entries of leaf `n` at `n << class`, for every leaf cut out so far.
    entries: Vec<Owner>,
    /// Leaves freed since the arena was last empty, reused first.
    freed: Vec<u32>,
    /// Leaves ever cut out of the array since the arena was last empty.
    used: u32,
    live: u32,
}

impl Arena {
    /// A leaf of `1 << class` entries.
    fn alloc(&mut self, class: usize) -> u32 {
        self.live += 1;
        if let Some(leaf) = self.freed.pop() {
            return leaf;
        }
        if self.entries.capacity() == 0 {
            self.entries.reserve_exact(FIRST_ENTRIES);
        }
        self.entries
            .resize(self.entries.len() + (1 << class), Owner::default());
        let leaf = self.used;
        self.used += 1;
        leaf
    }

    /// Returns `leaf`; the last leaf returned gives the array back but its first
    /// [`FIRST_ENTRIES`] (so that a leaf allocated and freed over and over does not
    /// allocate and free).
    fn release(&mut self, leaf: u32) {
        self.live -= 1;
        if self.live == 0 {
            self.entries.clear();
            self.entries.shrink_to(FIRST_ENTRIES);
            self.freed = Vec::new();
            self.used = 0;
        } else {
            self.freed.push(leaf);
        }
    }

    fn entries(&self, class: usize, leaf: u32) -> &[Owner] {
        let start = (leaf as usize) << class;
        &self.entries[start..start + (1 << class)]
    }

    fn entries_mut(&mut self, class: usize, leaf: u32) -> &mut [Owner] {
        let start = (leaf as usize) << class;
        &mut self.entries[start..start + (1 << class)]
    }

    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<Owner>() + self.freed.capacity() * 4
    }
}

/// The index of bit `bit` among the set bits of `taken` below it.
fn rank(taken: u64, bit: usize) -> usize {
    (taken & ((1u64 << bit) - 1)).count_ones() as usize
}

/// The index in its leaf at `place` of the entry of taken bit `bit` of a word whose taken
/// bits are `taken`: its bit in a direct-mapped leaf, the first in a one-entry leaf, its
/// rank among the taken bits in a packed leaf.
fn slot(place: Place, taken: u64, bit: usize) -> usize {
    match place.class() {
        DIRECT => bit,
        0 => 0,
        _ => rank(taken, bit),
    }
}

/// An allocated PASID's entry: its word's taken bits, its word and bit, its leaf, and its
/// index in the leaf.
#[derive(Clone, Copy, Debug)]
struct Entry {
    taken: u64,
    word: usize,
    bit: usize,
    place: Place,
    slot: usize,
}

/// The allocated PASIDs and their owners.
#[derive(Clone, Debug)]
pub(super) struct OwnerTable {
    /// The free PASIDs; each word's tag is its leaf's [`Place`] (meaningless for a word
    /// with nothing taken).
    free: FreeBitmap,
    arenas: [Arena; CLASSES],
}

impl OwnerTable {
    /// A table with every PASID free but PASID 0 (RID_PASID), which is taken and owned by
    /// no set.
    pub(super) fn new() -> Self {
        let mut table = OwnerTable {
            free: FreeBitmap::all_free(PASID_SPACE),
            arenas: Default::default(),
        };
        table.insert(Pasid::RID_PASID.raw(), Owner { set: NO_OWNER });
        table
    }

    /// The taken bits of `pasid`'s word, the word's leaf (meaningless when nothing is
    /// taken), and `pasid`'s word and bit.
    fn word(&self, pasid: u32) -> (u64, Place, usize, usize) {
        let (word, bit) = (pasid as usize / LEAF_SPAN, pasid as usize % LEAF_SPAN);
        let (free, place) = self.free.word_and_tag(word);
        (!free, Place(place), word, bit)
    }

    /// The leaf of bitmap word `word` (meaningless when nothing in it is taken).
    #[cfg(test)]
    fn place(&self, word: usize) -> Place {
        Place(self.free.word_and_tag(word).1)
    }

    /// Where `pasid`'s entry is, if it is taken.
    fn entry(&self, pasid: u32) -> Option<Entry> {
        let (taken, place, word, bit) = self.word(pasid);
        if taken & (1 << bit) == 0 {
            return None;
        }
        let slot = slot(place, taken, bit);
        Some(Entry {
            taken,
            word,
            bit,
            place,
            slot,
        })
    }

    fn entries(&self, place: Place) -> &[Owner] {
        self.arenas[place.class()].entries(place.class(), place.leaf())
    }

    fn entries_mut(&mut self, place: Place) -> &mut [Owner] {
        self.arenas[place.class()].entries_mut(place.class(), place.leaf())
    }

    /// The first free PASID at or above `from`, if any.
    pub(super) fn first_free_from(&mut self, from: u32) -> Option<u32> {
        self.free.first_free_from(from as usize).map(|p| p as u32)
    }

    /// Whether `pasid` is free.
    #[cfg(test)]
    pub(super) fn is_free(&self, pasid: u32) -> bool {
        self.free.is_free(pasid as usize)
    }

    /// The owner of `pasid`, if it is allocated to a set.
    pub(super) fn get(&self, pasid: u32) -> Option<Owner> {
        let e = self.entry(pasid)?;
        let owner = self.entries(e.place)[e.slot];
        (owner.set != NO_OWNER).then_some(owner)
    }

    /// Takes free `pasid` for `owner`. `pasid` must be below the space's size.
    pub(super) fn insert(&mut self, pasid: u32, owner: Owner) {
        let (taken, place, word, bit) = self.word(pasid);
        debug_assert_eq!(taken & (1 << bit), 0, "PASID {pasid} is taken");
        let class = place.class();
        if taken == 0 {
            let place = Place::new(0, self.arenas[0].alloc(0));
            self.free.set_tag(word, place.0);
            self.entries_mut(place)[0] = owner;
        } else if class == DIRECT {
            self.entries_mut(place)[bit] = owner;
        } else {
            let held = taken.count_ones() as usize;
            let at = rank(taken, bit);
            if held < 1 << class {
                let entries = self.entries_mut(place);
                entries.copy_within(at..held, at + 1);
                entries[at] = owner;
            } else {
                // Full: into a leaf of twice the room, packed or (at 64) direct-mapped.
                let mut all = [Owner::default(); LEAF_SPAN];
                let old = self.entries(place);
                all[..at].copy_from_slice(&old[..at]);
                all[at] = owner;
                all[at + 1..=held].copy_from_slice(&old[at..held]);
                self.move_leaf(word, place, class + 1, taken | 1 << bit, &all[..=held]);
            }
        }
        self.free.take(pasid as usize);
    }

    /// Moves `word`'s leaf from `from` to a new leaf of class `class` holding `packed`,
    /// the entries of the taken bits `taken` in ascending order.
    fn move_leaf(&mut self, word: usize, from: Place, class: usize, taken: u64, packed: &[Owner]) {
        let place = Place::new(class, self.arenas[class].alloc(class));
        let entries = self.entries_mut(place);
        if class == DIRECT {
            let mut bits = taken;
            for &owner in packed {
                entries[bits.trailing_zeros() as usize] = owner;
                bits &= bits - 1;
            }
        } else {
            entries[..packed.len()].copy_from_slice(packed);
        }
        self.arenas[from.class()].release(from.leaf());
        self.free.set_tag(word, place.0);
    }

    /// The PASIDs in `[min, max]` allocated to `set`, in ascending order: the taken bits
    /// of the range's bitmap words, each checked against its entry (words with none taken
    /// cost one bitmap read). `max` must be below the space's size.
    pub(super) fn owned_by(&self, set: u16, min: u32, max: u32) -> Vec<u32> {
        let (min, max) = (min as usize, max as usize);
        let mut owned = Vec::new();
        for word in min / LEAF_SPAN..=max / LEAF_SPAN {
            let (free, place) = self.free.word_and_tag(word);
            let all = !free;
            let mut taken = all;
            if word == min / LEAF_SPAN {
                taken &= u64::MAX << (min % LEAF_SPAN);
            }
            if word == max / LEAF_SPAN {
                taken &= u64::MAX >> (LEAF_SPAN - 1 - max % LEAF_SPAN);
            }
            if taken == 0 {
                continue;
            }
            let place = Place(place);
            let entries = self.entries(place);
            while taken != 0 {
                let bit = taken.trailing_zeros() as usize;
                taken &= taken - 1;
                if entries[slot(place, all, bit)].set == set {
                    owned.push((word * LEAF_SPAN + bit) as u32);
                }
            }
        }
        owned
    }

    /// Frees `pasid` if it is allocated to `set` and returns its owner; otherwise changes
    /// nothing and returns the owner it has, if any (PASID 0 stays taken).
    pub(super) fn remove(&mut self, pasid: u32, set: u16) -> Result<Owner, Option<Owner>> {
        let Some(e) = self.entry(pasid) else {
            return Err(None);
        };
        let owner = self.entries(e.place)[e.slot];
        if owner.set != set || set == NO_OWNER {
            return Err((owner.set != NO_OWNER).then_some(owner));
        }
        let left = e.taken & !(1 << e.bit);
        let class = e.place.class();
        if left == 0 {
            self.arenas[class].release(e.place.leaf());
        } else if class == DIRECT {
            let held = left.count_ones() as usize;
            if held <= LEAF_SPAN / 4 {
                let entries = self.entries(e.place);
                let mut packed = [Owner::default(); LEAF_SPAN / 4];
                let mut bits = left;
                for entry in &mut packed[..held] {
                    *entry = entries[bits.trailing_zeros() as usize];
                    bits &= bits - 1;
                }
                self.move_leaf(e.word, e.place, DIRECT - 1, left, &packed[..held]);
            }
        } else {
            let held = left.count_ones() as usize;
            let entries = self.entries_mut(e.place);
            entries.copy_within(e.slot + 1..=held, e.slot);
            if class >= 2 && held <= (1 << class) / 4 {
                let mut packed = [Owner::default(); LEAF_SPAN / 4];
                packed[..held].copy_from_slice(&entries[..held]);
                self.move_leaf(e.word, e.place, class - 1, left, &packed[..held]);
            }
        }
        self.free.release(pasid as usize);
        Ok(owner)
    }

    /// Heap bytes of the fixed table: the bitmap, with each word's leaf place.
    pub(super) fn fixed_bytes(&self) -> usize {
        self.free.heap_bytes()
    }

    /// Number of PASIDs with an owner.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        (0..PASID_SPACE / LEAF_SPAN)
            .map(|w| (!self.free.word_and_tag(w).0).count_ones() as usize)
            .sum::<usize>()
            - 1
    }

    /// Heap bytes of the leaves and their arenas.
    #[cfg(test)]
    fn leaf_bytes(&self) -> usize {
        self.arenas.iter().map(Arena::heap_bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn owner(set: u16) -> Owner {
        Owner { set }
    }

    /// A PASID below 2^16 as a set slot, for tests whose sets are their PASIDs' numbers.
    fn set_of(pasid: u32) -> u16 {
        u16::try_from(pasid).unwrap()
    }

    #[test]
    fn pasid_zero_is_taken_and_owned_by_none() {
        let mut t = OwnerTable::new();
        assert!(!t.is_free(0));
        assert_eq!(t.get(0), None);
        assert_eq!(t.remove(0, NO_OWNER), Err(None));
        assert!(!t.is_free(0));
        assert_eq!(t.first_free_from(0), Some(1));
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn a_leaf_grows_to_direct_and_shrinks_back() {
        let mut t = OwnerTable::new();
        // Word 1 (PASIDs 64..128), filled from the top so every insertion shifts; each
        // PASID's set is its own number, so that an entry moved to the wrong slot shows.
        for (i, p) in (64..128u32).rev().enumerate() {
            t.insert(p, owner(set_of(p)));
            let class = t.place(1).class();
            assert_eq!(1 << class, (i + 1).next_power_of_two(), "{} held", i + 1);
        }
        assert_eq!(t.place(1).class(), DIRECT);
        for p in 64..128 {
            assert_eq!(t.get(p), Some(owner(set_of(p))));
        }
        // Down to 16 held: packed into 32 again; to 8: 16 (a quarter of the room or less).
        for p in 64..112 {
            assert_eq!(t.remove(p, set_of(p)), Ok(owner(set_of(p))));
        }
        assert_eq!(t.place(1).class(), 5);
        for p in 112..120 {
            assert_eq!(t.remove(p, set_of(p)), Ok(owner(set_of(p))));
        }
        assert_eq!(t.place(1).class(), 4);
        for p in 120..128 {
            assert_eq!(t.get(p), Some(owner(set_of(p))));
        }
        for p in 120..128 {
            assert_eq!(t.remove(p, set_of(p) + 1), Err(Some(owner(set_of(p)))));
            assert_eq!(t.remove(p, set_of(p)), Ok(owner(set_of(p))));
        }
        assert_eq!(t.len(), 0);
        // Every arena gave its array back but its first 2 KiB.
        assert!(t
            .arenas
            .iter()
            .all(|a| a.entries.capacity() == FIRST_ENTRIES));
        assert_eq!(t.arenas[1..].iter().map(|a| a.live).sum::<u32>(), 0);
    }

    #[test]
    fn one_pasid_in_a_word_costs_one_entry() {
        let mut t = OwnerTable::new();
        for w in 1..200u32 {
            t.insert(w * 64 + 17, owner(set_of(w)));
        }
        assert!(t.arenas[1..].iter().all(|a| a.entries.capacity() == 0));
        // 200 one-entry leaves (PASID 0's included): the first 1024 entries.
        assert_eq!(t.leaf_bytes(), 1024 * 2);
        assert_eq!(t.get(5 * 64 + 17), Some(owner(5)));
        assert_eq!(t.get(5 * 64 + 16), None);
    }

    #[test]
    fn a_leaf_allocated_and_freed_over_and_over_reuses_its_array() {
        let mut t = OwnerTable::new();
        // PASID 1 moves PASID 0's leaf out of the one-entry class: it has no leaf left.
        t.insert(1, owner(1));
        assert_eq!(t.arenas[0].live, 0);
        t.insert(640, owner(1));
        let block = t.arenas[0].entries.as_ptr();
        for _ in 0..3 {
            assert_eq!(t.remove(640, 1), Ok(owner(1)));
            assert_eq!(t.arenas[0].live, 0);
            t.insert(640, owner(1));
            assert_eq!(t.arenas[0].entries.capacity(), FIRST_ENTRIES);
            assert_eq!(t.arenas[0].entries.as_ptr(), block);
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u32, u16),
        Remove(u32, u16),
        OwnedBy(u16, u32, u32),
    }

    /// PASIDs clustered in a few words (so that leaves fill, grow, shrink and empty) and
    /// spread over the whole space.
    fn pasid() -> impl Strategy<Value = u32> {
        prop_oneof![0u32..130, 4090u32..4102, 0u32..(PASID_SPACE as u32)]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Against a map of owners: every PASID's owner is the model's, a set's PASIDs in a
        /// range are the model's, the bitmap takes exactly the owned PASIDs (and PASID 0),
        /// the count agrees, and each leaf has room for fewer than four times its entries.
        #[test]
        fn agrees_with_model(ops in proptest::collection::vec(
            prop_oneof![
                3 => (pasid(), prop_oneof![0u16..3, 0u16..1000]).prop_map(|(p, s)| Op::Insert(p, s)),
                1 => (0u16..3, pasid(), pasid()).prop_map(|(s, a, b)| Op::OwnedBy(s, a.min(b), a.max(b))),
                2 => (pasid(), prop_oneof![0u16..1000, Just(NO_OWNER)]).prop_map(|(p, s)| Op::Remove(p, s)),
            ],
            1..400,
        )) {
            let mut t = OwnerTable::new();
            let mut model: BTreeMap<u32, Owner> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Insert(p, set) => {
                        if p != 0 && !model.contains_key(&p) {
                            prop_assert!(t.is_free(p));
                            t.insert(p, owner(set));
                            model.insert(p, owner(set));
                        }
                    }
                    Op::OwnedBy(set, min, max) => {
                        let own: Vec<u32> = model.range(min..=max).filter(|(_, o)| o.set == set).map(|(&p, _)| p).collect();
                        prop_assert_eq!(t.owned_by(set, min, max), own);
                    }
                    Op::Remove(p, set) => match model.get(&p).copied() {
                        Some(o) if o.set == set => {
                            prop_assert_eq!(t.remove(p, set), Ok(o));
                            model.remove(&p);
                        }
                        held => prop_assert_eq!(t.remove(p, set), Err(held)),
                    },
                }
                prop_assert_eq!(t.len(), model.len());
                for (&p, &o) in &model {
                    prop_assert_eq!(t.get(p), Some(o));
                    prop_assert!(!t.is_free(p));
                }
                for w in model.keys().map(|&p| p as usize / LEAF_SPAN) {
                    let held = (!t.free.word_and_tag(w).0).count_ones() as usize;
                    prop_assert!(1 << t.place(w).class() < 4 * held);
                }
            }
            for p in [0, 63, 64, 4095, 4096, 0xf_ffff] {
                prop_assert_eq!(t.get(p), model.get(&p).copied());
                prop_assert_eq!(t.is_free(p), p != 0 && !model.contains_key(&p));
            }
        }
    }
}
