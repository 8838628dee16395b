//! Committed partial states kept across batches, so a key folded again soon
//! after its last commit is not read from RocksDB and parsed again.
//!
//! The cache holds only what is in the store (a state, or `None`: known to have
//! none), written to it by this loop: while a loop folds a partition no one else
//! writes that partition's rows of its generation, so a cached value cannot go
//! stale. It is per fold loop and starts empty with each loop; a revoked
//! partition's entries are dropped (another worker may fold it before it comes
//! back).
//!
//! Bounded by an estimate of the heap it holds, in two generations: entries go
//! into the young one; when it is full the old one is dropped and the young one
//! becomes old. A hit in the old generation moves the entry to the young one, so
//! what is used stays and what is not ages out, without a per-access list.

use hashbrown::{Equivalent, HashMap};

use crate::projection::State;
use crate::store::SourcePartition;

/// One key's partial state in one source partition.
pub(super) type CacheKey = (String, SourcePartition);

/// A [`CacheKey`] borrowed, to look an entry up without allocating its key (it
/// hashes as the owned key does: the string, then the partition).
#[derive(Hash)]
pub(super) struct KeyRef<'a>(pub(super) &'a str, pub(super) &'a SourcePartition);

impl Equivalent<CacheKey> for KeyRef<'_> {
    fn equivalent(&self, key: &CacheKey) -> bool {
        self.0 == key.0 && *self.1 == key.1
    }
}

/// The maps of states by key: hashbrown with its default hasher (foldhash,
/// seeded per process), which SipHash-ed every key several times per event.
pub(super) type KeyMap<V> = HashMap<CacheKey, V>;

/// A cached state and the bytes charged for it.
type Entry = (Option<State>, usize);

/// A bounded map of committed partial states.
pub(super) struct StateCache {
    young: KeyMap<Entry>,
    old: KeyMap<Entry>,
    young_bytes: usize,
    /// Bytes one generation may hold (half the configured size).
    generation_bytes: usize,
    /// Set once an entry was dropped to make room: from then on a key that is
    /// not cached may still have a stored state.
    evicted: bool,
}

impl StateCache {
    /// A cache holding about `bytes` of states (0: none).
    pub(super) fn new(bytes: usize) -> Self {
        StateCache {
            young: KeyMap::default(),
            old: KeyMap::default(),
            young_bytes: 0,
            generation_bytes: bytes / 2,
            evicted: false,
        }
    }

    /// False for a cache of size 0, which keeps nothing.
    pub(super) fn is_enabled(&self) -> bool {
        self.generation_bytes > 0
    }

    /// Takes `key`'s committed state, and its owned key, out of the cache (the
    /// caller is about to change it); `None` when it is not cached.
    pub(super) fn take(&mut self, key: &KeyRef<'_>) -> Option<(CacheKey, Option<State>)> {
        if let Some((owned, (state, bytes))) = self.young.remove_entry(key) {
            self.young_bytes = self.young_bytes.saturating_sub(bytes);
            return Some((owned, state));
        }
        self.old
            .remove_entry(key)
            .map(|(owned, (state, _))| (owned, state))
    }

    /// `key`'s committed state, when cached.
    pub(super) fn get(&mut self, key: &KeyRef<'_>) -> Option<&Option<State>> {
        if !self.young.contains_key(key) {
            let (owned, (state, bytes)) = self.old.remove_entry(key)?;
            self.insert_charged(owned, state, bytes);
        }
        self.young.get(key).map(|(state, _)| state)
    }

    /// Remembers `key`'s state as committed (or read from the store), whose
    /// stored form is `encoded_len` bytes long.
    pub(super) fn insert(&mut self, key: CacheKey, state: Option<State>, encoded_len: usize) {
        let bytes = entry_bytes(key.0.len(), encoded_len);
        self.insert_charged(key, state, bytes);
    }

    fn insert_charged(&mut self, key: CacheKey, state: Option<State>, bytes: usize) {
        if self.generation_bytes == 0 {
            return;
        }
        if self.young_bytes.saturating_add(bytes) > self.generation_bytes {
            self.evicted |= !self.old.is_empty();
            self.old = std::mem::take(&mut self.young);
            self.young_bytes = 0;
        }
        self.old.remove(&key);
        self.young_bytes = self.young_bytes.saturating_add(bytes);
        if let Some((_, replaced)) = self.young.insert(key, (state, bytes)) {
            self.young_bytes = self.young_bytes.saturating_sub(replaced);
        }
    }

    /// True once the cache has dropped an entry to make room (a cache of size 0
    /// keeps nothing, so it has).
    pub(super) fn has_evicted(&self) -> bool {
        self.evicted || !self.is_enabled()
    }

    /// Forgets every entry of `partition`.
    pub(super) fn drop_partition(&mut self, partition: &SourcePartition) {
        self.young.retain(|(_, p), _| p != partition);
        self.old.retain(|(_, p), _| p != partition);
        self.young_bytes = self.young.values().map(|(_, bytes)| bytes).sum();
    }

    /// Entries cached.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }
}

/// Bytes charged per entry besides its key and state: the map slot, the key's
/// `SourcePartition`, the state's box, allocator rounding.
const ENTRY_OVERHEAD: usize = 128;

/// An estimate of the heap an entry holds. A decoded state takes several times
/// its stored form (struct fields at their full width, a heap allocation per
/// string, a node per JSON value); the README gives the bench's measured RSS.
pub(super) fn entry_bytes(key_len: usize, encoded_len: usize) -> usize {
    ENTRY_OVERHEAD
        .saturating_add(key_len.saturating_mul(2))
        .saturating_add(encoded_len.saturating_mul(4))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str, partition: i32) -> CacheKey {
        (
            name.to_owned(),
            SourcePartition {
                topic: "t".into(),
                partition,
            },
        )
    }

    fn get<'c>(cache: &'c mut StateCache, key: &CacheKey) -> Option<&'c Option<State>> {
        cache.get(&KeyRef(&key.0, &key.1))
    }

    fn number(state: Option<&Option<State>>) -> Option<Option<u32>> {
        state.map(|s| s.as_ref().map(|b| *b.downcast_ref::<u32>().unwrap()))
    }

    #[test]
    fn entries_are_found_taken_and_dropped_by_partition() {
        let mut cache = StateCache::new(1 << 20);
        cache.insert(key("a", 0), Some(Box::new(1u32)), 4);
        cache.insert(key("b", 1), None, 0);
        assert_eq!(number(get(&mut cache, &key("a", 0))), Some(Some(1)));
        assert_eq!(
            number(get(&mut cache, &key("b", 1))),
            Some(None),
            "known to have no state"
        );
        assert_eq!(
            number(get(&mut cache, &key("a", 1))),
            None,
            "another partition's partial"
        );
        let wanted = key("a", 0);
        let (owned, taken) = cache.take(&KeyRef(&wanted.0, &wanted.1)).unwrap();
        assert_eq!(owned, wanted, "the owned key comes back");
        assert_eq!(taken.map(|b| *b.downcast::<u32>().unwrap()), Some(1));
        assert_eq!(number(get(&mut cache, &key("a", 0))), None, "taken out");
        cache.insert(key("a", 0), Some(Box::new(2u32)), 4);
        cache.drop_partition(&SourcePartition {
            topic: "t".into(),
            partition: 0,
        });
        assert_eq!((number(get(&mut cache, &key("a", 0))), cache.len()), (None, 1));
    }

    #[test]
    fn the_estimate_bounds_the_entries_and_recent_ones_stay() {
        let per_entry = entry_bytes("order-000000".len(), 40);
        let mut cache = StateCache::new(per_entry * 100);
        for i in 0..1_000u32 {
            cache.insert(key(&format!("order-{i:06}"), 0), Some(Box::new(i)), 40);
            // Key 0 is used all the time: it must survive the turnover.
            assert_eq!(
                number(get(&mut cache, &key("order-000000", 0))),
                Some(Some(0)),
                "after {i}"
            );
        }
        assert!(cache.len() <= 100, "{} entries", cache.len());
        assert!(
            get(&mut cache, &key("order-000999", 0)).is_some(),
            "the newest stays"
        );
        assert!(
            get(&mut cache, &key("order-000500", 0)).is_none(),
            "an old one is gone"
        );
    }

    #[test]
    fn a_cache_of_size_zero_holds_nothing() {
        let mut cache = StateCache::new(0);
        cache.insert(key("a", 0), Some(Box::new(1u32)), 4);
        assert_eq!((get(&mut cache, &key("a", 0)).is_none(), cache.len()), (true, 0));
    }
}
