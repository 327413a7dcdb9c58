//! The context cache and the PASID cache (VT-d §6.2.1, §6.2.3): entries kept by value
//! under a reader-writer lock, with a count of entries readable without the lock.
//!
//! A lookup that finds the count at zero misses without taking the lock: after a global
//! invalidation (the cold miss after `vsva bench`'s flush, a guest that re-reads its
//! entries) a miss costs one load instead of a lock round trip. A cache may miss at any
//! time (hardware caches any subset of what it reads), so a lookup that reads a count
//! older than a concurrent fill and misses is still correct; the count is written under
//! the write lock, at the end of every change, so that a thread sees its own fills.

use std::collections::HashMap;
use std::hash::Hash;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{PoisonError, RwLock, RwLockWriteGuard};

use foldhash::fast::RandomState;

/// Cached entries by key, and how many there are.
#[derive(Debug)]
pub(crate) struct EntryCache<K, V> {
    entries: RwLock<HashMap<K, V, RandomState>>,
    /// The number of entries after the last change (written under the write lock).
    len: AtomicUsize,
}

impl<K, V> Default for EntryCache<K, V> {
    fn default() -> Self {
        EntryCache {
            entries: RwLock::default(),
            len: AtomicUsize::new(0),
        }
    }
}

impl<K: Eq + Hash, V: Copy> EntryCache<K, V> {
    /// The cached entry of `key`; a miss without the lock when the cache is empty.
    pub(crate) fn get(&self, key: &K) -> Option<V> {
        if self.len.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.entries
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .copied()
    }

    /// The entries, locked for a change; the count is updated when the guard goes.
    pub(crate) fn write(&self) -> EntryCacheWrite<'_, K, V> {
        EntryCacheWrite {
            entries: self.entries.write().unwrap_or_else(PoisonError::into_inner),
            len: &self.len,
        }
    }

    /// Number of cached entries.
    pub(crate) fn len(&self) -> usize {
        self.entries
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// The entries of an [`EntryCache`] under its write lock.
pub(crate) struct EntryCacheWrite<'a, K, V> {
    entries: RwLockWriteGuard<'a, HashMap<K, V, RandomState>>,
    len: &'a AtomicUsize,
}

impl<K, V> Deref for EntryCacheWrite<'_, K, V> {
    type Target = HashMap<K, V, RandomState>;

    fn deref(&self) -> &Self::Target {
        &self.entries
    }
}

impl<K, V> DerefMut for EntryCacheWrite<'_, K, V> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.entries
    }
}

impl<K, V> Drop for EntryCacheWrite<'_, K, V> {
    /// Runs before the guard field is dropped: the count is written under the lock.
    fn drop(&mut self) {
        self.len.store(self.entries.len(), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lookup_sees_what_was_cached_until_it_is_removed() {
        let c: EntryCache<u16, u64> = EntryCache::default();
        assert_eq!(c.get(&1), None);
        c.write().insert(1, 10);
        c.write().insert(2, 20);
        assert_eq!(
            (c.get(&1), c.get(&2), c.get(&3)),
            (Some(10), Some(20), None)
        );
        assert_eq!(c.len(), 2);
        c.write().retain(|&k, _| k != 1);
        assert_eq!((c.get(&1), c.get(&2)), (None, Some(20)));
        c.write().clear();
        assert_eq!((c.get(&2), c.len()), (None, 0));
        c.write().insert(2, 21);
        assert_eq!(c.get(&2), Some(21));
    }
}
