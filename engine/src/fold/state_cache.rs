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

use std::collections::HashMap;
use std::mem::size_of;

use serde_json::Value as Json;

use crate::store::SourcePartition;

/// One key's partial state in one source partition.
pub(super) type CacheKey = (String, SourcePartition);

/// Bytes charged per entry besides its key and value: the map slot, the key's
/// `SourcePartition`, allocator rounding.
const ENTRY_OVERHEAD: usize = 64;

/// A bounded map of committed partial states.
pub(super) struct StateCache {
    young: HashMap<CacheKey, Option<Json>>,
    old: HashMap<CacheKey, Option<Json>>,
    young_bytes: usize,
    /// Bytes one generation may hold (half the configured size).
    generation_bytes: usize,
}

impl StateCache {
    /// A cache holding about `bytes` of states (0: none).
    pub(super) fn new(bytes: usize) -> Self {
        StateCache {
            young: HashMap::new(),
            old: HashMap::new(),
            young_bytes: 0,
            generation_bytes: bytes / 2,
        }
    }

    /// Takes `key`'s committed state out of the cache (the caller is about to
    /// change it); `None` when it is not cached.
    pub(super) fn take(&mut self, key: &CacheKey) -> Option<Option<Json>> {
        match self.young.remove(key) {
            Some(value) => {
                self.young_bytes = self
                    .young_bytes
                    .saturating_sub(entry_bytes(key.0.len(), value.as_ref()));
                Some(value)
            }
            None => self.old.remove(key),
        }
    }

    /// A copy of `key`'s committed state, when cached.
    pub(super) fn get(&mut self, key: &CacheKey) -> Option<Option<Json>> {
        if let Some(value) = self.young.get(key) {
            return Some(value.clone());
        }
        let value = self.old.remove(key)?;
        self.insert(key.clone(), value.clone());
        Some(value)
    }

    /// Remembers `key`'s state as committed (or read from the store).
    pub(super) fn insert(&mut self, key: CacheKey, value: Option<Json>) {
        if self.generation_bytes == 0 {
            return;
        }
        let bytes = entry_bytes(key.0.len(), value.as_ref());
        if self.young_bytes.saturating_add(bytes) > self.generation_bytes {
            self.old = std::mem::take(&mut self.young);
            self.young_bytes = 0;
        }
        self.young_bytes = self.young_bytes.saturating_add(bytes);
        self.old.remove(&key);
        let key_len = key.0.len();
        if let Some(replaced) = self.young.insert(key, value) {
            self.young_bytes = self
                .young_bytes
                .saturating_sub(entry_bytes(key_len, replaced.as_ref()));
        }
    }

    /// Forgets every entry of `partition`.
    pub(super) fn drop_partition(&mut self, partition: &SourcePartition) {
        self.young.retain(|(_, p), _| p != partition);
        self.old.retain(|(_, p), _| p != partition);
    }

    /// Entries cached.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }
}

/// An estimate of the heap an entry holds: the key, the value's nodes and strings.
fn entry_bytes(key_len: usize, value: Option<&Json>) -> usize {
    ENTRY_OVERHEAD
        .saturating_add(key_len)
        .saturating_add(value.map_or(0, json_bytes))
}

/// An estimate of the heap a JSON value holds (serde_json's tree: a `Value` per
/// node, a `String` per string and object key, map and vector slots).
fn json_bytes(value: &Json) -> usize {
    let node = size_of::<Json>();
    match value {
        Json::Null | Json::Bool(_) | Json::Number(_) => node,
        Json::String(s) => node.saturating_add(s.len()),
        Json::Array(items) => items
            .iter()
            .fold(node, |sum, item| sum.saturating_add(json_bytes(item))),
        Json::Object(map) => map.iter().fold(node, |sum, (key, item)| {
            // A map slot holds the key's `String` beside the value, and B-tree
            // nodes are rarely full.
            sum.saturating_add(2 * size_of::<String>())
                .saturating_add(key.len())
                .saturating_add(json_bytes(item))
        }),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

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

    #[test]
    fn entries_are_found_taken_and_dropped_by_partition() {
        let mut cache = StateCache::new(1 << 20);
        cache.insert(key("a", 0), Some(json!({"n": 1})));
        cache.insert(key("b", 1), None);
        assert_eq!(cache.get(&key("a", 0)), Some(Some(json!({"n": 1}))));
        assert_eq!(cache.get(&key("b", 1)), Some(None), "known to have no state");
        assert_eq!(cache.get(&key("a", 1)), None, "another partition's partial");
        assert_eq!(cache.take(&key("a", 0)), Some(Some(json!({"n": 1}))));
        assert_eq!(cache.get(&key("a", 0)), None, "taken out");
        cache.insert(key("a", 0), Some(json!(2)));
        cache.drop_partition(&SourcePartition {
            topic: "t".into(),
            partition: 0,
        });
        assert_eq!((cache.get(&key("a", 0)), cache.len()), (None, 1));
    }

    #[test]
    fn the_estimate_bounds_the_entries_and_recent_ones_stay() {
        let value = json!({"order_id": "order-1", "status": "placed", "total_cents": 1234});
        let per_entry = entry_bytes("order-000000".len(), Some(&value));
        let mut cache = StateCache::new(per_entry * 100);
        for i in 0..1_000 {
            cache.insert(key(&format!("order-{i:06}"), 0), Some(value.clone()));
            // Key 0 is used all the time: it must survive the turnover.
            assert!(cache.get(&key("order-000000", 0)).is_some(), "after {i}");
        }
        assert!(cache.len() <= 100, "{} entries", cache.len());
        assert!(cache.get(&key("order-000999", 0)).is_some(), "the newest stays");
        assert!(cache.get(&key("order-000500", 0)).is_none(), "an old one is gone");
    }

    #[test]
    fn a_cache_of_size_zero_holds_nothing() {
        let mut cache = StateCache::new(0);
        cache.insert(key("a", 0), Some(json!(1)));
        assert_eq!((cache.get(&key("a", 0)), cache.len()), (None, 0));
    }
}
