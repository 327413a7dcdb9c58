//! The host PASID allocator: one global 20-bit PASID space shared by all VMs, handed out
//! through per-VM PASID sets with a quota, as Linux's ioasid sets do for `vfio_mm`.
//!
//! PASID 0 is never allocated: scalable-mode Linux programs it as RID_PASID, the PASID of
//! requests without a PASID prefix (VT-d 3.0 §9.4, context entry RID_PASID field).
//!
//! Costs: `alloc` finds the first free PASID in a constant number of bitmap word operations
//! (one when the low part of the space is full: the search starts at the bitmap's bound
//! below which nothing is free), records its owner in the leaf of its bitmap word and
//! counts it in its set; `free` checks the owner and uncounts it; both are O(1) whatever
//! the occupancy (a leaf moves at most 64 entries when it grows or shrinks), and `owner`
//! is a bitmap word with its leaf's place and an entry, without hashing. Sets are found by id
//! in a table of at most 65,535 slots, without hashing (see the `sets` module: an id is a
//! slot and that slot's reuse count, so that the owner table can name a set in two bytes;
//! a 65,536th live set is refused with ENOSPC). A set keeps no list of its PASIDs: listing
//! them (`owned_in`) and destroying the set scan the taken bits of the range asked (the
//! whole space for a destroy), one bitmap word per 64 PASIDs and an entry per taken one,
//! so that a churn at high occupancy touches no per-set list (see the `owners` module).
//!
//! Memory: a fixed 258 KiB bitmap (16 bytes per 64 PASIDs: the free bits and where their
//! owner entries are, in one cache line), and per allocated PASID a 2-byte owner entry
//! (its set's slot; with its leaf's spare room and its arena's fewer than 16 bytes,
//! besides the leaves an arena keeps free after churn: see the `owners` module); measured
//! by `testbed/tests/bench_heap.rs` and `vsva bench` (`bytes_per_pasid_*`).

mod bitmap;
mod owners;
mod sets;

use std::fmt;

use vsva_uapi::error::UapiError;
use vsva_vtd::addr::Pasid;

use crate::error::HostError;
use owners::{Owner, OwnerTable};
use sets::{PasidSet, SetTable};

/// The quota of a PASID set unless its creator asks for another (the seed series'
/// `pasid_quota` module parameter default).
pub const DEFAULT_QUOTA: u32 = 1000;

/// Number of PASIDs in the space, PASID 0 included.
const PASID_SPACE: usize = 1 << Pasid::BITS;

/// A set slot no set gets: the owner of the reserved PASID 0 in the owner table.
const NO_OWNER: u16 = u16::MAX;

/// The identifier of one VM's PASID set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PasidSetId(u32);

impl PasidSetId {
    /// A set id from its raw number (for tests and diagnostics; sets are made by
    /// [`PasidAllocator::create_set`]).
    pub const fn from_raw(raw: u32) -> Self {
        PasidSetId(raw)
    }

    /// The raw number.
    pub const fn raw(self) -> u32 {
        self.0
    }
}

impl fmt::Display for PasidSetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pasid-set:{}", self.0)
    }
}

/// The global PASID allocator.
#[derive(Clone, Debug)]
pub struct PasidAllocator {
    /// The free PASIDs, and each allocated PASID's owner.
    owners: OwnerTable,
    allocated: usize,
    sets: SetTable,
}

impl Default for PasidAllocator {
    fn default() -> Self {
        Self::new()
    }
}

impl PasidAllocator {
    /// An allocator with every PASID but 0 free and no sets.
    pub fn new() -> Self {
        PasidAllocator {
            owners: OwnerTable::new(),
            allocated: 0,
            sets: SetTable::new(),
        }
    }

    /// Creates an empty set that may hold up to `quota` PASIDs.
    ///
    /// Errors: 65,535 sets live already → ENOSPC.
    pub fn create_set(&mut self, quota: u32) -> Result<PasidSetId, HostError> {
        self.sets.create(quota).ok_or(HostError::TooManySets {
            max: sets::MAX_SETS,
        })
    }

    /// Allocates the lowest free PASID in `[min, max]` to `set`.
    ///
    /// Errors: `min > max` or `max` beyond 20 bits → EINVAL; unknown set → EINVAL; set at
    /// its quota or no free PASID in the range → ENOSPC.
    pub fn alloc(&mut self, set: PasidSetId, min: u32, max: u32) -> Result<Pasid, HostError> {
        if min > max || max > Pasid::MAX.raw() {
            return Err(HostError::from(UapiError::BadPasidRange { min, max }));
        }
        let members = self.sets.get_mut(set).ok_or(HostError::UnknownSet(set))?;
        if members.held >= members.quota {
            return Err(HostError::QuotaExceeded {
                set,
                quota: members.quota,
            });
        }
        let raw = match self.owners.first_free_from(min) {
            Some(p) if p <= max => p,
            _ => return Err(HostError::NoFreePasid { min, max }),
        };
        let pasid = Pasid::new(raw).map_err(|e| HostError::field("PASID", e.to_string()))?;
        self.owners.insert(
            raw,
            Owner {
                set: members.slot(),
            },
        );
        members.held += 1;
        self.allocated += 1;
        Ok(pasid)
    }

    /// Frees `pasid`, which must be allocated to `set` (else EPERM, as the seed's
    /// `vfio_iommu_type1_pasid_free` answers for a PASID of another owner or none).
    pub fn free(&mut self, set: PasidSetId, pasid: Pasid) -> Result<(), HostError> {
        let not_owner = |owner| HostError::NotOwner { pasid, set, owner };
        let Some(slot) = self.sets.get(set).map(PasidSet::slot) else {
            return Err(not_owner(self.owner(pasid)));
        };
        if let Err(owner) = self.owners.remove(pasid.raw(), slot) {
            return Err(not_owner(owner.and_then(|o| self.sets.id_at(o.set))));
        }
        self.allocated -= 1;
        if let Some(members) = self.sets.get_mut(set) {
            members.held -= 1;
        }
        Ok(())
    }

    /// The set `pasid` is allocated to, if any.
    pub fn owner(&self, pasid: Pasid) -> Option<PasidSetId> {
        self.owners
            .get(pasid.raw())
            .and_then(|o| self.sets.id_at(o.set))
    }

    /// Ok when `pasid` is allocated to `set`; EPERM otherwise.
    pub fn check_owner(&self, set: PasidSetId, pasid: Pasid) -> Result<(), HostError> {
        match self.owner(pasid) {
            Some(owner) if owner == set => Ok(()),
            owner => Err(HostError::NotOwner { pasid, set, owner }),
        }
    }

    /// The PASIDs of `set` within `[min, max]`, in ascending order (a scan of the range's
    /// taken PASIDs: O((max - min) / 64 + taken in the range)).
    pub fn owned_in(&self, set: PasidSetId, min: u32, max: u32) -> Result<Vec<Pasid>, HostError> {
        if min > max || max > Pasid::MAX.raw() {
            return Err(HostError::from(UapiError::BadPasidRange { min, max }));
        }
        let members = self.sets.get(set).ok_or(HostError::UnknownSet(set))?;
        Ok(pasids(self.owners.owned_by(members.slot(), min, max)))
    }

    /// Number of PASIDs `set` holds.
    pub fn allocated(&self, set: PasidSetId) -> Result<u32, HostError> {
        let members = self.sets.get(set).ok_or(HostError::UnknownSet(set))?;
        Ok(members.held)
    }

    /// The quota of `set`.
    pub fn quota(&self, set: PasidSetId) -> Result<u32, HostError> {
        let members = self.sets.get(set).ok_or(HostError::UnknownSet(set))?;
        Ok(members.quota)
    }

    /// Number of PASIDs allocated across all sets.
    pub fn total_allocated(&self) -> usize {
        self.allocated
    }

    /// Destroys `set`, freeing all its PASIDs; returns them in ascending order so the caller
    /// can tear down whatever was bound to them (a scan of the whole space's taken PASIDs).
    pub fn destroy_set(&mut self, set: PasidSetId) -> Result<Vec<Pasid>, HostError> {
        let members = self.sets.remove(set).ok_or(HostError::UnknownSet(set))?;
        let owned = self.owners.owned_by(members.slot(), 0, Pasid::MAX.raw());
        debug_assert_eq!(owned.len(), members.held as usize, "{set}'s count");
        for &raw in &owned {
            let removed = self.owners.remove(raw, members.slot());
            debug_assert!(removed.is_ok(), "member {raw} of {set} not held by it");
        }
        self.allocated -= owned.len();
        Ok(pasids(owned))
    }

    /// Heap bytes of the fixed table (the free bitmap, each of its words with its leaf's
    /// place), taken whatever the occupancy.
    pub fn fixed_bytes(&self) -> usize {
        self.owners.fixed_bytes()
    }
}

/// Raw PASIDs (all allocated, so valid) as PASIDs.
fn pasids(raw: Vec<u32>) -> Vec<Pasid> {
    raw.into_iter().filter_map(|p| Pasid::new(p).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn p(raw: u32) -> Pasid {
        Pasid::new(raw).unwrap()
    }

    #[test]
    fn pasid_zero_is_reserved() {
        let mut a = PasidAllocator::new();
        let s = a.create_set(10).unwrap();
        assert_eq!(a.alloc(s, 0, 10).unwrap(), p(1));
        let e = a.alloc(s, 0, 0).unwrap_err();
        assert_eq!(e.errno(), -libc::ENOSPC);
        assert_eq!(a.owner(p(0)), None);
    }

    #[test]
    fn range_and_set_errors() {
        let mut a = PasidAllocator::new();
        let s = a.create_set(10).unwrap();
        assert_eq!(a.alloc(s, 5, 4).unwrap_err().errno(), -libc::EINVAL);
        assert_eq!(
            a.alloc(s, 1, 1 << 20).unwrap_err(),
            HostError::from(UapiError::BadPasidRange {
                min: 1,
                max: 1 << 20
            })
        );
        let ghost = PasidSetId::from_raw(99);
        assert_eq!(
            a.alloc(ghost, 1, 2).unwrap_err(),
            HostError::UnknownSet(ghost)
        );
        assert_eq!(a.destroy_set(ghost).unwrap_err().errno(), -libc::EINVAL);
    }

    #[test]
    fn quota_is_enforced() {
        let mut a = PasidAllocator::new();
        let s = a.create_set(2).unwrap();
        a.alloc(s, 1, 100).unwrap();
        let second = a.alloc(s, 1, 100).unwrap();
        assert_eq!(
            a.alloc(s, 1, 100).unwrap_err(),
            HostError::QuotaExceeded { set: s, quota: 2 }
        );
        a.free(s, second).unwrap();
        assert_eq!(a.alloc(s, 1, 100).unwrap(), second);
    }

    #[test]
    fn a_destroyed_sets_id_does_not_reach_its_slots_next_set() {
        let mut a = PasidAllocator::new();
        let old = a.create_set(4).unwrap();
        let x = a.alloc(old, 1, 1).unwrap();
        assert_eq!(a.destroy_set(old).unwrap(), vec![x]);
        let new = a.create_set(4).unwrap();
        assert_ne!(new, old);
        let y = a.alloc(new, 1, 1).unwrap();
        assert_eq!((y, a.owner(y)), (x, Some(new)));
        assert_eq!(
            a.free(old, y).unwrap_err(),
            HostError::NotOwner {
                pasid: y,
                set: old,
                owner: Some(new)
            }
        );
        assert_eq!(a.owned_in(old, 0, 10), Err(HostError::UnknownSet(old)));
        assert_eq!(a.owned_in(new, 0, 10).unwrap(), vec![y]);
        a.free(new, y).unwrap();
        assert_eq!(a.owner(y), None);
    }

    #[test]
    fn at_most_65535_sets_are_live() {
        let mut a = PasidAllocator::new();
        let sets: Vec<_> = (0..65_535).map(|_| a.create_set(1).unwrap()).collect();
        let last = *sets.last().unwrap();
        let p = a.alloc(last, 1, 1).unwrap();
        assert_eq!(a.owner(p), Some(last));
        let e = a.create_set(1).unwrap_err();
        assert_eq!(
            (e.errno(), e),
            (-libc::ENOSPC, HostError::TooManySets { max: 65_535 })
        );
        assert_eq!(a.destroy_set(sets[7]).unwrap(), vec![]);
        let again = a.create_set(1).unwrap();
        assert_eq!(a.owner(p), Some(last));
        a.free(last, p).unwrap();
        assert_eq!(a.alloc(again, 1, 1).unwrap(), p);
    }

    #[test]
    fn free_checks_ownership() {
        let mut a = PasidAllocator::new();
        let s1 = a.create_set(10).unwrap();
        let s2 = a.create_set(10).unwrap();
        let x = a.alloc(s1, 1, 100).unwrap();
        let e = a.free(s2, x).unwrap_err();
        assert_eq!(e.errno(), -libc::EPERM);
        assert_eq!(
            e,
            HostError::NotOwner {
                pasid: x,
                set: s2,
                owner: Some(s1)
            }
        );
        assert_eq!(a.owner(x), Some(s1));
        assert_eq!(a.free(s1, p(77)).unwrap_err().errno(), -libc::EPERM);
        a.free(s1, x).unwrap();
        assert_eq!(a.free(s1, x).unwrap_err().errno(), -libc::EPERM);
    }

    #[test]
    fn every_nonzero_pasid_is_allocatable() {
        let mut a = PasidAllocator::new();
        let s = a.create_set(u32::MAX).unwrap();
        for expected in 1..=Pasid::MAX.raw() {
            assert_eq!(a.alloc(s, 0, Pasid::MAX.raw()).unwrap().raw(), expected);
        }
        assert_eq!(a.total_allocated(), (1 << 20) - 1);
        assert_eq!(
            a.alloc(s, 0, Pasid::MAX.raw()).unwrap_err().errno(),
            -libc::ENOSPC
        );
        a.free(s, p(0x8_1234)).unwrap();
        assert_eq!(
            a.alloc(s, 0x10, 0x8_1233).unwrap_err().errno(),
            -libc::ENOSPC
        );
        assert_eq!(a.alloc(s, 0x10, 0xf_ffff).unwrap(), p(0x8_1234));
        assert_eq!(a.destroy_set(s).unwrap().len(), (1 << 20) - 1);
        assert_eq!(a.total_allocated(), 0);
    }

    #[test]
    fn owned_in_lists_only_the_set() {
        let mut a = PasidAllocator::new();
        let s1 = a.create_set(10).unwrap();
        let s2 = a.create_set(10).unwrap();
        let x1 = a.alloc(s1, 1, 100).unwrap();
        let _y = a.alloc(s2, 1, 100).unwrap();
        let x2 = a.alloc(s1, 1, 100).unwrap();
        assert_eq!(a.owned_in(s1, 0, 100).unwrap(), vec![x1, x2]);
        assert_eq!(a.owned_in(s1, x2.raw(), x2.raw()).unwrap(), vec![x2]);
    }

    /// The owner table and the sets' counts describe the same PASIDs: each live set's
    /// count is the number of PASIDs whose entry names it, the counts add up to
    /// `total_allocated`, each of the first `below` PASIDs with an owner is owned by a live
    /// set, and the bitmap takes exactly the owned ones (and PASID 0).
    fn counts_match(a: &PasidAllocator, below: u32) -> Result<(), TestCaseError> {
        let mut members = 0;
        for set in a.sets.iter() {
            let owned = a.owners.owned_by(set.slot(), 0, Pasid::MAX.raw());
            prop_assert_eq!(owned.len(), set.held as usize);
            members += owned.len();
        }
        prop_assert_eq!(members, a.total_allocated());
        prop_assert_eq!(a.owners.len(), a.total_allocated());
        for raw in 0..below {
            if let Some(entry) = a.owners.get(raw) {
                prop_assert!(a.sets.id_at(entry.set).is_some());
                prop_assert!(!a.owners.is_free(raw));
            } else {
                prop_assert_eq!(a.owners.is_free(raw), raw != 0);
            }
        }
        Ok(())
    }

    /// One step of the property test.
    #[derive(Clone, Debug)]
    enum Op {
        Create(u32),
        Alloc {
            set: usize,
            min: u32,
            max: u32,
        },
        Free {
            set: usize,
            pasid: u32,
        },
        /// Frees the n-th allocated PASID (modulo their number) through its owner.
        FreeOwned(usize),
        OwnedIn {
            set: usize,
            min: u32,
            max: u32,
        },
        Destroy(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            1 => (0u32..6).prop_map(Op::Create),
            // Half the allocations ask for the lowest free PASID of the whole range, as a VMM does.
            6 => (0usize..6, prop_oneof![0u32..2, 0u32..40], 0u32..48).prop_map(|(set, min, max)| Op::Alloc { set, min, max }),
            3 => (0usize..6, 0u32..48).prop_map(|(set, pasid)| Op::Free { set, pasid }),
            2 => any::<usize>().prop_map(Op::FreeOwned),
            1 => (0usize..6, 0u32..48, 0u32..48).prop_map(|(set, min, max)| Op::OwnedIn { set, min, max }),
            1 => (0usize..6).prop_map(Op::Destroy),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Against a model: no PASID is handed out twice, frees respect ownership, quotas are
        /// never exceeded, a freed PASID is the next one handed out from its place, and a set
        /// destroy frees exactly its own PASIDs. A failed call changes nothing, and the
        /// owner table always agrees with the sets' counts.
        #[test]
        fn matches_model(ops in proptest::collection::vec(op(), 1..120)) {
            let mut a = PasidAllocator::new();
            let mut sets: Vec<PasidSetId> = Vec::new();
            let mut quotas: BTreeMap<PasidSetId, u32> = BTreeMap::new();
            let mut model: BTreeMap<u32, PasidSetId> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Create(q) => {
                        let s = a.create_set(q).unwrap();
                        prop_assert!(!quotas.contains_key(&s));
                        quotas.insert(s, q);
                        sets.push(s);
                    }
                    Op::Alloc { set, min, max } => {
                        let Some(&s) = sets.get(set) else { continue };
                        let held = model.values().filter(|&&o| o == s).count() as u32;
                        let expected = (min.max(1)..=max).find(|q| !model.contains_key(q));
                        let r = a.alloc(s, min, max);
                        match quotas.get(&s) {
                            _ if min > max => prop_assert_eq!(r, Err(HostError::from(UapiError::BadPasidRange { min, max }))),
                            None => prop_assert_eq!(r, Err(HostError::UnknownSet(s))),
                            Some(&q) if held >= q => prop_assert_eq!(r, Err(HostError::QuotaExceeded { set: s, quota: q })),
                            Some(_) => match expected {
                                Some(e) => {
                                    prop_assert_eq!(r.unwrap().raw(), e);
                                    model.insert(e, s);
                                }
                                None => prop_assert_eq!(r, Err(HostError::NoFreePasid { min, max })),
                            },
                        }
                    }
                    Op::Free { set, pasid } => {
                        let Some(&s) = sets.get(set) else { continue };
                        let r = a.free(s, p(pasid));
                        if model.get(&pasid) == Some(&s) {
                            prop_assert_eq!(r, Ok(()));
                            model.remove(&pasid);
                        } else {
                            prop_assert_eq!(r.unwrap_err().errno(), -libc::EPERM);
                        }
                    }
                    Op::FreeOwned(n) => {
                        let Some((&pasid, &s)) = model.iter().nth(n % model.len().max(1)) else { continue };
                        prop_assert_eq!(a.free(s, p(pasid)), Ok(()));
                        model.remove(&pasid);
                    }
                    Op::OwnedIn { set, min, max } => {
                        let Some(&s) = sets.get(set) else { continue };
                        let r = a.owned_in(s, min, max);
                        if min > max {
                            prop_assert_eq!(r, Err(HostError::from(UapiError::BadPasidRange { min, max })));
                        } else if quotas.contains_key(&s) {
                            let own: Vec<Pasid> = model.range(min..=max).filter(|(_, &o)| o == s).map(|(&k, _)| p(k)).collect();
                            prop_assert_eq!(r, Ok(own));
                        } else {
                            prop_assert_eq!(r, Err(HostError::UnknownSet(s)));
                        }
                    }
                    Op::Destroy(set) => {
                        let Some(&s) = sets.get(set) else { continue };
                        let r = a.destroy_set(s);
                        if quotas.remove(&s).is_some() {
                            let own: Vec<Pasid> = model.iter().filter(|(_, &o)| o == s).map(|(&k, _)| p(k)).collect();
                            prop_assert_eq!(r.unwrap(), own);
                            model.retain(|_, o| *o != s);
                        } else {
                            prop_assert_eq!(r, Err(HostError::UnknownSet(s)));
                        }
                    }
                }
                prop_assert_eq!(a.total_allocated(), model.len());
                for (&s, &q) in &quotas {
                    let held = model.values().filter(|&&o| o == s).count() as u32;
                    prop_assert!(held <= q);
                    prop_assert_eq!(a.allocated(s).unwrap(), held);
                }
                for raw in 0..48u32 {
                    prop_assert_eq!(a.owner(p(raw)), model.get(&raw).copied());
                }
                counts_match(&a, 48)?;
            }
        }
    }
}
