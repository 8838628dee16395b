//! One open batch of a fold loop: a write-back cache of the partial states its
//! events changed, and the next offset of every partition it read. Committed as
//! one RocksDB write (DESIGN.md invariant 1); until then nothing of it is visible.
//! Committed states stay in the loop's [`StateCache`], so the next batch finds
//! them without reading the store.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde_json::Value as Json;

use crate::poison::PoisonReason;
use crate::projection::{Event, EventMeta, FoldError, PartitionState, Projection};
use crate::schemas::CurrentEvent;
use super::state_cache::{CacheKey, StateCache};
use crate::store::{BatchWrite, Generation, SourcePartition, Store, StoreError};

/// Cache entries as they were before a message changed them (`None`: not cached),
/// to restore when a later event of the same message fails.
type UndoLog = Vec<(CacheKey, Option<Option<Json>>)>;

/// Why folding a message into the batch stopped.
#[derive(Debug)]
pub(super) enum Stop {
    /// The event is bad: the poison policy decides.
    Poison { reason: PoisonReason, error: String },
    /// Shutting down while waiting (for the registry); the message is left for
    /// the next run.
    Interrupted,
    /// The fold panicked: the batch's cache may be half-changed and must be
    /// dropped unwritten.
    Panicked(String),
    /// The store could not give a key's state (an unreadable row, I/O): not the
    /// event's fault, so not a poison event.
    Store(StoreError),
}

/// What a committed batch hands to the store and to the metrics.
pub(super) struct Taken {
    /// The rows and offsets to write.
    pub(super) write: BatchWrite,
    /// Events folded.
    pub(super) events: u64,
    /// Their record timestamps (ms), for the freshness histogram.
    pub(super) timestamps: Vec<i64>,
}

/// The open batch.
pub(super) struct Batch {
    /// States changed by this batch's events.
    cache: HashMap<CacheKey, Option<Json>>,
    /// States as committed, from earlier batches or read from the store.
    committed: StateCache,
    offsets: BTreeMap<SourcePartition, i64>,
    events: u64,
    timestamps: Vec<i64>,
    started: Option<Instant>,
}

impl Batch {
    /// An empty batch whose loop keeps about `cache_bytes` of committed states.
    pub(super) fn new(cache_bytes: usize) -> Self {
        Batch {
            cache: HashMap::new(),
            committed: StateCache::new(cache_bytes),
            offsets: BTreeMap::new(),
            events: 0,
            timestamps: Vec::new(),
            started: None,
        }
    }

    /// Folds the events one message decoded to (an upcaster may split an event)
    /// into the cache. When it fails the cache is as it was before the message,
    /// except after a panic ([`Stop::Panicked`]): then the batch must be dropped.
    pub(super) fn fold_message(
        &mut self,
        projection: &dyn Projection,
        source: (&Store, &Generation),
        events: &[CurrentEvent],
        meta: &EventMeta,
        partition: &SourcePartition,
    ) -> Result<(), Stop> {
        if let [event] = events {
            return self.fold_event(projection, source, event, meta, partition, None);
        }
        let mut undo = Vec::new();
        for event in events {
            if let Err(stop) = self.fold_event(projection, source, event, meta, partition, Some(&mut undo)) {
                for (key, before) in undo.into_iter().rev() {
                    match before {
                        Some(state) => self.cache.insert(key, state),
                        None => self.cache.remove(&key),
                    };
                }
                return Err(stop);
            }
        }
        Ok(())
    }

    /// Folds one event into the cache. With `undo`, records each cache entry's
    /// value before its first change.
    fn fold_event(
        &mut self,
        projection: &dyn Projection,
        (store, generation): (&Store, &Generation),
        current: &CurrentEvent,
        meta: &EventMeta,
        partition: &SourcePartition,
        undo: Option<&mut UndoLog>,
    ) -> Result<(), Stop> {
        let event = Event {
            name: &current.name,
            payload: &current.payload,
            meta,
        };
        let mut state = BatchState {
            cache: &mut self.cache,
            committed: &mut self.committed,
            store,
            generation,
            partition,
            undo,
            store_failure: None,
        };
        match crate::panics::contained(|| projection.apply(&event, &mut state)) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => match state.store_failure.take() {
                Some(failure) => Err(Stop::Store(failure)),
                None => Err(Stop::Poison {
                    reason: PoisonReason::FoldFailed,
                    error: e.0,
                }),
            },
            Err(panic) => Err(Stop::Panicked(panic)),
        }
    }

    /// Counts a message as applied (folded, or skipped by policy): its partition's
    /// next offset becomes `next`.
    pub(super) fn advance(&mut self, partition: SourcePartition, next: i64, timestamp_ms: Option<i64>) {
        self.offsets.insert(partition, next);
        self.events += 1;
        if let Some(timestamp) = timestamp_ms {
            self.timestamps.push(timestamp);
        }
        self.started.get_or_insert_with(Instant::now);
    }

    /// Events applied since the last commit.
    #[cfg(test)]
    pub(super) fn events(&self) -> u64 {
        self.events
    }

    /// True when the batch holds `max_events` events or its first is `max_wait` old.
    pub(super) fn is_due(&self, max_events: u64, max_wait: Duration) -> bool {
        self.events >= max_events || self.started.is_some_and(|s| s.elapsed() >= max_wait)
    }

    /// Empties the batch into what is to be committed; `None` when no message was
    /// applied since the last commit.
    pub(super) fn take(&mut self) -> Option<Taken> {
        self.started = None;
        if self.offsets.is_empty() {
            return None;
        }
        Some(Taken {
            write: BatchWrite {
                rows: self
                    .cache
                    .drain()
                    .map(|((key, partition), state)| (key, partition, state))
                    .collect(),
                offsets: std::mem::take(&mut self.offsets),
            },
            events: std::mem::take(&mut self.events),
            timestamps: std::mem::take(&mut self.timestamps),
        })
    }

    /// Keeps the rows of a batch just written as the committed states.
    pub(super) fn written(&mut self, rows: Vec<(String, SourcePartition, Option<Json>)>) {
        for (key, partition, state) in rows {
            self.committed.insert((key, partition), state);
        }
    }

    /// Forgets the committed states of a partition this loop no longer folds.
    pub(super) fn drop_partition(&mut self, partition: &SourcePartition) {
        self.committed.drop_partition(partition);
    }
}

/// One source partition's states as a fold sees them: the batch's cache over the
/// store.
struct BatchState<'a> {
    cache: &'a mut HashMap<CacheKey, Option<Json>>,
    committed: &'a mut StateCache,
    store: &'a Store,
    generation: &'a Generation,
    partition: &'a SourcePartition,
    undo: Option<&'a mut UndoLog>,
    /// Set when the store failed to give a state: the loop fails instead of
    /// treating the event as poison.
    store_failure: Option<StoreError>,
}

impl BatchState<'_> {
    fn entry(&mut self, key: &str) -> Result<&mut Option<Json>, FoldError> {
        let cache_key = (key.to_owned(), self.partition.clone());
        if let Some(undo) = self.undo.as_deref_mut() {
            if !undo.iter().any(|(k, _)| *k == cache_key) {
                undo.push((cache_key.clone(), self.cache.get(&cache_key).cloned()));
            }
        }
        let (store, generation, partition) = (self.store, self.generation, self.partition);
        Ok(match self.cache.entry(cache_key) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => {
                let current = match self.committed.take(entry.key()) {
                    Some(committed) => committed,
                    None => read_stored(store, generation, partition, key, &mut self.store_failure)?,
                };
                entry.insert(current)
            }
        })
    }
}

/// `key`'s stored partial state; a store failure is also kept in `failure`, so the
/// loop can tell it from the projection's own errors.
fn read_stored(
    store: &Store,
    generation: &Generation,
    partition: &SourcePartition,
    key: &str,
    failure: &mut Option<StoreError>,
) -> Result<Option<Json>, FoldError> {
    store.partial(generation, key, partition).map_err(|e| {
        let error = FoldError(format!("reading the current state of `{key}`: {e}"));
        *failure = Some(e);
        error
    })
}

impl PartitionState for BatchState<'_> {
    fn get(&mut self, key: &str) -> Result<Option<Json>, FoldError> {
        let cache_key = (key.to_owned(), self.partition.clone());
        if let Some(cached) = self.cache.get(&cache_key) {
            return Ok(cached.clone());
        }
        if let Some(committed) = self.committed.get(&cache_key) {
            return Ok(committed);
        }
        let stored = read_stored(
            self.store,
            self.generation,
            self.partition,
            key,
            &mut self.store_failure,
        )?;
        self.committed.insert(cache_key, stored.clone());
        Ok(stored)
    }

    fn update(
        &mut self,
        key: &str,
        change: &mut dyn FnMut(&mut Option<Json>) -> Result<(), FoldError>,
    ) -> Result<(), FoldError> {
        change(self.entry(key)?)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use apache_avro::types::Value;
    use serde_json::json;

    use super::*;
    use crate::projection::Entity;

    /// Counts events per `key` field; fails on `"fail"`, panics on `"panic"`
    /// after changing the state.
    struct Counter;

    impl Entity for Counter {
        fn key(&self, event: &Event<'_>) -> Result<Option<String>, FoldError> {
            match event.payload {
                Value::Record(fields) => Ok(fields.iter().find_map(|(name, value)| match value {
                    Value::String(key) if name == "key" => Some(key.clone()),
                    _ => None,
                })),
                _ => Ok(None),
            }
        }

        fn fold(&self, state: &mut Option<Json>, event: &Event<'_>) -> Result<(), FoldError> {
            let count = state.as_ref().and_then(Json::as_u64).unwrap_or(0);
            match event.name {
                "fail" => Err(FoldError("refused".into())),
                "panic" => {
                    *state = Some(json!("half-done"));
                    panic!("boom")
                }
                _ => {
                    *state = Some(json!(count + 1));
                    Ok(())
                }
            }
        }

        fn merge(&self, _key: &str, partials: Vec<Json>) -> Result<Option<Json>, FoldError> {
            Ok(partials.into_iter().next())
        }
    }

    fn event(name: &str, key: &str) -> CurrentEvent {
        CurrentEvent {
            name: Arc::from(name),
            payload: Value::Record(vec![("key".into(), Value::String(key.into()))]),
        }
    }

    fn partition(n: i32) -> SourcePartition {
        SourcePartition {
            topic: "t".into(),
            partition: n,
        }
    }

    fn meta(offset: i64) -> EventMeta {
        EventMeta {
            topic: "t".into(),
            partition: 0,
            offset,
            timestamp_ms: Some(1_000 + offset),
            key: None,
        }
    }

    fn store() -> (tempfile::TempDir, Store, Generation) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), false).unwrap();
        let generation = store.live_generation("p").unwrap();
        (dir, store, generation)
    }

    #[test]
    fn a_commit_writes_the_changed_keys_and_the_next_offsets() {
        let (_dir, store, generation) = store();
        let mut batch = Batch::new(1 << 20);
        for (offset, key) in ["a", "b", "a"].into_iter().enumerate() {
            let offset = offset as i64;
            batch
                .fold_message(
                    &Counter,
                    (&store, &generation),
                    &[event("e", key)],
                    &meta(offset),
                    &partition(0),
                )
                .unwrap();
            batch.advance(partition(0), offset + 1, Some(1_000 + offset));
        }
        assert_eq!(batch.events(), 3);
        let taken = batch.take().expect("something to commit");
        assert_eq!(
            (taken.events, taken.timestamps.clone()),
            (3, vec![1_000, 1_001, 1_002])
        );
        assert_eq!(taken.write.offsets, BTreeMap::from([(partition(0), 3)]));
        store.commit(&generation, &taken.write).unwrap();
        let view = store.read_view(&generation).unwrap();
        assert_eq!(view.partials("a").unwrap(), vec![json!(2)]);
        assert_eq!(view.partials("b").unwrap(), vec![json!(1)]);
        assert!(batch.take().is_none(), "an empty batch commits nothing");
    }

    #[test]
    fn a_written_state_is_found_by_the_next_batch_until_its_partition_is_dropped() {
        let (_dir, store, generation) = store();
        let mut batch = Batch::new(1 << 20);
        let source = (&store, &generation);
        let mut fold = |batch: &mut Batch, offset: i64| {
            batch
                .fold_message(&Counter, source, &[event("e", "a")], &meta(offset), &partition(0))
                .unwrap();
            batch.advance(partition(0), offset + 1, None);
            batch.take().unwrap().write.rows
        };
        // Kept as written but never given to the store: only the cache knows it.
        let rows = fold(&mut batch, 0);
        batch.written(rows);
        let rows = fold(&mut batch, 1);
        assert_eq!(rows, vec![("a".to_owned(), partition(0), Some(json!(2)))]);
        batch.written(rows);
        batch.drop_partition(&partition(0));
        let rows = fold(&mut batch, 2);
        assert_eq!(
            rows,
            vec![("a".to_owned(), partition(0), Some(json!(1)))],
            "read from the store again, which has nothing"
        );
    }

    #[test]
    fn a_message_whose_second_event_fails_leaves_the_cache_as_before_it() {
        let (_dir, store, generation) = store();
        let mut batch = Batch::new(1 << 20);
        let source = (&store, &generation);
        batch
            .fold_message(&Counter, source, &[event("e", "a")], &meta(0), &partition(0))
            .unwrap();
        batch.advance(partition(0), 1, None);
        // An upcaster split this message in three; the last event fails.
        let split = [event("e", "a"), event("e", "b"), event("fail", "c")];
        let stop = batch.fold_message(&Counter, source, &split, &meta(1), &partition(0));
        assert!(
            matches!(&stop, Err(Stop::Poison { reason: PoisonReason::FoldFailed, error }) if error == "refused"),
            "{stop:?}"
        );
        let taken = batch.take().unwrap();
        let mut rows = taken.write.rows;
        rows.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(
            rows,
            vec![("a".to_owned(), partition(0), Some(json!(1)))],
            "only the first message's change"
        );
    }

    #[test]
    fn a_panicking_fold_is_reported_not_propagated() {
        let (_dir, store, generation) = store();
        let mut batch = Batch::new(1 << 20);
        let stop = batch.fold_message(
            &Counter,
            (&store, &generation),
            &[event("panic", "a")],
            &meta(0),
            &partition(0),
        );
        assert!(
            matches!(&stop, Err(Stop::Panicked(message)) if message == "panicked: boom"),
            "{stop:?}"
        );
    }

    #[test]
    fn an_unreadable_stored_state_is_a_store_failure_not_poison() {
        let (dir, store, generation) = store();
        let mut first = Batch::new(1 << 20);
        first
            .fold_message(
                &Counter,
                (&store, &generation),
                &[event("e", "a")],
                &meta(0),
                &partition(0),
            )
            .unwrap();
        first.advance(partition(0), 1, None);
        let mut write = first.take().unwrap().write;
        write.rows[0].2 = Some(json!(1));
        store.commit(&generation, &write).unwrap();
        drop(store);
        // Damage the row from outside: raw bytes that are not JSON.
        {
            let path = dir.path();
            let families = rocksdb::DB::list_cf(&rocksdb::Options::default(), path).unwrap();
            let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), path, &families).unwrap();
            let cf = db.cf_handle("p@1").unwrap();
            let row = db
                .iterator_cf(&cf, rocksdb::IteratorMode::Start)
                .map(|item| item.unwrap().0)
                .find(|key| key.starts_with(b"s"))
                .unwrap();
            db.put_cf(&cf, row, b"\xff not json").unwrap();
        }
        let store = Store::open(dir.path(), false).unwrap();
        let mut batch = Batch::new(1 << 20);
        let stop = batch.fold_message(
            &Counter,
            (&store, &generation),
            &[event("e", "a")],
            &meta(1),
            &partition(0),
        );
        assert!(
            matches!(&stop, Err(Stop::Store(e)) if e.to_string().contains("state row of `a` from t/0")),
            "{stop:?}"
        );
    }
}
