//! One open batch of a fold loop: a write-back cache of the partial states its
//! events changed, and the next offset of every partition it read. Committed as
//! one RocksDB write (DESIGN.md invariant 1); until then nothing of it is visible.
//! Committed states stay in the loop's [`StateCache`], so the next batch finds
//! them without reading and decoding the store's rows.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hashbrown::Equivalent;

use super::state_cache::{CacheKey, KeyMap, KeyRef, StateCache};
use crate::poison::PoisonReason;
use crate::projection::{Event, EventMeta, FoldError, PartitionState, Projection, State};
use crate::schemas::CurrentEvent;
use crate::store::{BatchWrite, Generation, SourcePartition, Store, StoreError};

/// States as they were before a message changed them (`None`: not in the
/// batch), to restore when a later event of the same message fails. Copies are
/// made through the projection's codec: only messages an upcaster split need it.
type UndoLog = Vec<(CacheKey, Option<Option<State>>)>;

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

/// A state the projection could not encode for the store: a defect of the
/// projection, not of an event.
#[derive(Debug, thiserror::Error)]
#[error("encoding the state of `{key}` from {partition} for the store: {error}")]
pub(super) struct EncodeError {
    key: String,
    partition: SourcePartition,
    error: FoldError,
}

/// What a committed batch hands to the store and to the metrics.
pub(super) struct Taken {
    /// The rows and offsets to write.
    pub(super) write: BatchWrite,
    /// The states of the rows, for the cache once written, with their encoded sizes.
    pub(super) states: Vec<(CacheKey, Option<State>, usize)>,
    /// Events folded.
    pub(super) events: u64,
    /// Their record timestamps (ms), for the freshness histogram.
    pub(super) timestamps: Vec<i64>,
}

/// The open batch.
pub(super) struct Batch {
    /// States changed by this batch's events.
    cache: KeyMap<Option<State>>,
    /// States as committed, from earlier batches or read from the store.
    committed: StateCache,
    offsets: BTreeMap<SourcePartition, i64>,
    /// Partitions of which the store held no state when this loop began folding
    /// them: every state of theirs is one this loop committed, so while the
    /// committed cache has dropped nothing, a key it does not hold has none.
    fresh: hashbrown::HashSet<SourcePartition>,
    events: u64,
    timestamps: Vec<i64>,
    started: Option<Instant>,
}

impl Batch {
    /// An empty batch whose loop keeps about `cache_bytes` of committed states.
    pub(super) fn new(cache_bytes: usize) -> Self {
        Batch {
            cache: KeyMap::default(),
            committed: StateCache::new(cache_bytes),
            offsets: BTreeMap::new(),
            fresh: hashbrown::HashSet::new(),
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
        if !self.fresh.is_empty() && self.committed.has_evicted() {
            self.fresh.clear();
        }
        let mut state = BatchState {
            projection,
            fresh: self.fresh.contains(partition),
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

    /// Counts a message as applied (folded, or skipped by policy; a duplicate
    /// passed over is not `counted` in the batch's events): its partition's next
    /// offset becomes `next`.
    pub(super) fn advance(
        &mut self,
        partition: SourcePartition,
        next: i64,
        timestamp_ms: Option<i64>,
        counted: bool,
    ) {
        self.offsets.insert(partition, next);
        if counted {
            self.events += 1;
        }
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

    /// True when the batch holds `max_events` events or (with `max_wait`) its
    /// first is `max_wait` old.
    pub(super) fn is_due(&self, max_events: u64, max_wait: Option<Duration>) -> bool {
        self.events >= max_events
            || max_wait.is_some_and(|wait| self.started.is_some_and(|s| s.elapsed() >= wait))
    }

    /// Empties the batch into what is to be committed, its states encoded by
    /// `projection`; `None` when no message was applied since the last commit.
    pub(super) fn take(&mut self, projection: &dyn Projection) -> Result<Option<Taken>, EncodeError> {
        self.started = None;
        if self.offsets.is_empty() {
            return Ok(None);
        }
        let mut rows = Vec::with_capacity(self.cache.len());
        let mut states = Vec::with_capacity(self.cache.len());
        for ((key, partition), state) in self.cache.drain() {
            let encoded = match &state {
                Some(state) => Some(projection.encode(state).map_err(|error| EncodeError {
                    key: key.clone(),
                    partition: partition.clone(),
                    error,
                })?),
                None => None,
            };
            let encoded_len = encoded.as_ref().map_or(0, Vec::len);
            rows.push((key.clone(), partition.clone(), encoded));
            states.push(((key, partition), state, encoded_len));
        }
        Ok(Some(Taken {
            write: BatchWrite {
                rows,
                offsets: std::mem::take(&mut self.offsets),
                ..BatchWrite::default()
            },
            states,
            events: std::mem::take(&mut self.events),
            timestamps: std::mem::take(&mut self.timestamps),
        }))
    }

    /// Keeps the states of a batch just written as the committed states.
    pub(super) fn written(&mut self, states: Vec<(CacheKey, Option<State>, usize)>) {
        for (key, state, encoded_len) in states {
            self.committed.insert(key, state, encoded_len);
        }
    }

    /// Notes what the store said of `partition` when this loop first read its
    /// offset: with no offset stored, it holds no state of the partition either
    /// (they are written together), so keys the committed cache does not hold
    /// need not be looked up while the cache keeps everything it was given.
    pub(super) fn note_stored_offset(&mut self, partition: &SourcePartition, stored: Option<i64>) {
        if stored.is_none() && !self.committed.has_evicted() {
            self.fresh.insert(partition.clone());
        }
    }

    /// Forgets the committed states of a partition this loop no longer folds.
    pub(super) fn drop_partition(&mut self, partition: &SourcePartition) {
        self.committed.drop_partition(partition);
        self.fresh.remove(partition);
    }
}

/// One source partition's states as a fold sees them: the batch's cache over the
/// committed states over the store.
struct BatchState<'a> {
    projection: &'a dyn Projection,
    /// The store holds no state of this partition that is not in `committed`
    /// (see [`Batch::note_stored_offset`]).
    fresh: bool,
    cache: &'a mut KeyMap<Option<State>>,
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
    /// `key`'s stored partial state and the length of its row; a store failure
    /// is also kept in `store_failure`, so the loop can tell it from the
    /// projection's own errors.
    fn read_stored(&mut self, key: &str) -> Result<Option<(State, usize)>, FoldError> {
        if self.fresh {
            return Ok(None);
        }
        let projection = self.projection;
        self.store
            .partial(self.generation, key, self.partition, |bytes| {
                projection.decode(bytes).map(|state| (state, bytes.len()))
            })
            .map_err(|e| {
                let error = FoldError(format!("reading the current state of `{key}`: {e}"));
                self.store_failure = Some(e);
                error
            })
    }
}

/// A copy of a state, through the projection's codec.
fn copy(projection: &dyn Projection, state: &Option<State>) -> Result<Option<State>, FoldError> {
    state
        .as_ref()
        .map(|s| projection.decode(&projection.encode(s)?))
        .transpose()
}

impl PartitionState for BatchState<'_> {
    fn get(&mut self, key: &str) -> Result<Option<&State>, FoldError> {
        let lookup = KeyRef(key, self.partition);
        if self.cache.contains_key(&lookup) {
            return Ok(self.cache.get(&lookup).and_then(Option::as_ref));
        }
        if self.committed.get(&lookup).is_none() {
            let (state, len) = match self.read_stored(key)? {
                Some((state, len)) => (Some(state), len),
                None => (None, 0),
            };
            let cache_key = (key.to_owned(), self.partition.clone());
            if !self.committed.is_enabled() {
                // Nowhere to keep it but the batch, where it is written back unchanged.
                return Ok(self.cache.entry(cache_key).or_insert(state).as_ref());
            }
            self.committed.insert(cache_key, state, len);
        }
        Ok(self.committed.get(&lookup).and_then(Option::as_ref))
    }

    fn update(
        &mut self,
        key: &str,
        change: &mut dyn FnMut(&mut Option<State>) -> Result<(), FoldError>,
    ) -> Result<(), FoldError> {
        let lookup = KeyRef(key, self.partition);
        if let Some(slot) = self.cache.get_mut(&lookup) {
            if let Some(undo) = self.undo.as_deref_mut() {
                if !undo.iter().any(|(k, _)| lookup.equivalent(k)) {
                    let before = copy(self.projection, slot)?;
                    undo.push(((key.to_owned(), self.partition.clone()), Some(before)));
                }
            }
            return change(slot);
        }
        let (cache_key, current) = match self.committed.take(&lookup) {
            Some(committed) => committed,
            None => (
                (key.to_owned(), self.partition.clone()),
                self.read_stored(key)?.map(|(state, _)| state),
            ),
        };
        if let Some(undo) = self.undo.as_deref_mut() {
            undo.push((cache_key.clone(), None));
        }
        change(self.cache.entry(cache_key).or_insert(current))
    }
}

#[cfg(test)]
mod tests;
