//! Folding each event id once: the ids a loop's generation has folded, per source
//! partition, the most recent `window` of them (and, optionally, none older than
//! `max_age_seconds` before the newest). A partition's window is read from the
//! store the first time the loop meets the partition, kept in memory while the
//! loop folds it, and changed in the store only by the batches that fold its
//! events ([`crate::store::SeenId`]).
//!
//! Ids are kept as the first 16 bytes of their SHA-256: a fixed size whatever the
//! ids look like, and a collision (two distinct ids taken for one) is as likely
//! as guessing a 128-bit key.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::config::DedupConfig;
use crate::store::{Generation, SeenId, SourcePartition, Store, StoreError, ID_DIGEST_BYTES};

/// Ids to write and ids to delete (by partition and offset) with a batch.
pub(super) type IdChanges = (Vec<(SourcePartition, SeenId)>, Vec<(SourcePartition, i64)>);

/// An id's digest.
pub(super) type Digest = [u8; ID_DIGEST_BYTES];

/// The digest of an event id.
pub(super) fn digest(id: &[u8]) -> Digest {
    let hash = ring::digest::digest(&ring::digest::SHA256, id);
    let mut out = [0u8; ID_DIGEST_BYTES];
    out.copy_from_slice(&hash.as_ref()[..ID_DIGEST_BYTES]);
    out
}

/// One partition's remembered ids.
#[derive(Default)]
struct Window {
    /// Oldest offset first.
    order: VecDeque<SeenId>,
    digests: HashSet<Digest>,
}

/// The loop's windows, and what the open batch changes in them.
pub(super) struct Dedup {
    window: usize,
    max_age_ms: Option<i64>,
    partitions: HashMap<SourcePartition, Window>,
    /// Ids folded since the last commit, to write with the batch.
    seen: Vec<(SourcePartition, SeenId)>,
    /// Ids dropped from a window since the last commit, to delete with the batch.
    forgotten: Vec<(SourcePartition, i64)>,
    /// Duplicates passed over and events without an id since the last commit.
    pub(super) duplicates: u64,
    pub(super) without_id: u64,
}

impl Dedup {
    pub(super) fn new(config: &DedupConfig) -> Dedup {
        Dedup {
            window: config.window.max(1),
            max_age_ms: config
                .max_age_seconds
                .map(|s| i64::try_from(s.saturating_mul(1_000)).unwrap_or(i64::MAX)),
            partitions: HashMap::new(),
            seen: Vec::new(),
            forgotten: Vec::new(),
            duplicates: 0,
            without_id: 0,
        }
    }

    /// True when `partition`'s window holds `digest`.
    pub(super) fn is_duplicate(
        &mut self,
        store: &Store,
        generation: &Generation,
        partition: &SourcePartition,
        digest: &Digest,
    ) -> Result<bool, StoreError> {
        Ok(self
            .window_of(store, generation, partition)?
            .digests
            .contains(digest))
    }

    /// Remembers an id just folded, forgetting what falls out of the window.
    pub(super) fn remember(&mut self, partition: &SourcePartition, seen: SeenId) {
        let (limit, max_age_ms) = (self.window, self.max_age_ms);
        let window = self.partitions.entry(partition.clone()).or_default();
        window.digests.insert(seen.digest);
        window.order.push_back(seen);
        self.seen.push((partition.clone(), seen));
        let newest = seen.timestamp_ms;
        while let Some(oldest) = window.order.front().copied() {
            let too_old = max_age_ms.is_some_and(|age| oldest.timestamp_ms < newest.saturating_sub(age));
            if window.order.len() <= limit && !too_old {
                break;
            }
            window.order.pop_front();
            window.digests.remove(&oldest.digest);
            self.forgotten.push((partition.clone(), oldest.offset));
        }
    }

    /// What the open batch changed: ids to write and ids to delete.
    pub(super) fn take(&mut self) -> IdChanges {
        (
            std::mem::take(&mut self.seen),
            std::mem::take(&mut self.forgotten),
        )
    }

    /// Forgets a partition this loop no longer folds (read again if it returns).
    pub(super) fn drop_partition(&mut self, partition: &SourcePartition) {
        self.partitions.remove(partition);
    }

    fn window_of(
        &mut self,
        store: &Store,
        generation: &Generation,
        partition: &SourcePartition,
    ) -> Result<&Window, StoreError> {
        if !self.partitions.contains_key(partition) {
            let mut window = Window::default();
            for seen in store.seen_ids(generation, partition)? {
                window.digests.insert(seen.digest);
                window.order.push_back(seen);
            }
            self.partitions.insert(partition.clone(), window);
        }
        Ok(&self.partitions[partition])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(offset: i64, id: &str, timestamp_ms: i64) -> SeenId {
        SeenId {
            offset,
            digest: digest(id.as_bytes()),
            timestamp_ms,
        }
    }

    fn config(window: usize, max_age_seconds: Option<u64>) -> DedupConfig {
        DedupConfig {
            header: Some("ce_id".into()),
            id: None,
            window,
            max_age_seconds,
        }
    }

    #[test]
    fn ids_survive_a_store_round_trip_and_fall_out_of_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), false).unwrap();
        let generation = store.live_generation("p").unwrap();
        let partition = SourcePartition {
            topic: "orders".into(),
            partition: 3,
        };
        let mut dedup = Dedup::new(&config(2, None));
        assert!(!dedup
            .is_duplicate(&store, &generation, &partition, &digest(b"a"))
            .unwrap());
        for (offset, id) in [(10, "a"), (11, "b"), (12, "c")] {
            dedup.remember(&partition, seen(offset, id, 0));
        }
        let (seen_ids, forgotten) = dedup.take();
        assert_eq!(seen_ids.len(), 3);
        assert_eq!(forgotten, vec![(partition.clone(), 10)]);
        let write = crate::store::BatchWrite {
            offsets: [(partition.clone(), 13)].into(),
            seen: seen_ids,
            forgotten,
            ..Default::default()
        };
        store.commit(&generation, &write).unwrap();
        // A put and a delete of one id in one batch leave no row.
        let stored: Vec<i64> = store
            .seen_ids(&generation, &partition)
            .unwrap()
            .iter()
            .map(|s| s.offset)
            .collect();
        assert_eq!(stored, vec![11, 12]);
        let mut fresh = Dedup::new(&config(2, None));
        assert!(fresh
            .is_duplicate(&store, &generation, &partition, &digest(b"b"))
            .unwrap());
        assert!(fresh
            .is_duplicate(&store, &generation, &partition, &digest(b"c"))
            .unwrap());
        assert!(!fresh
            .is_duplicate(&store, &generation, &partition, &digest(b"a"))
            .unwrap());
    }

    #[test]
    fn max_age_forgets_ids_older_than_the_newest_by_more_than_it() {
        let partition = SourcePartition {
            topic: "orders".into(),
            partition: 0,
        };
        let mut dedup = Dedup::new(&config(100, Some(10)));
        dedup.remember(&partition, seen(0, "old", 1_000));
        dedup.remember(&partition, seen(1, "mid", 6_000));
        dedup.remember(&partition, seen(2, "new", 11_500));
        let (_, forgotten) = dedup.take();
        assert_eq!(forgotten, vec![(partition, 0)]);
    }
}
