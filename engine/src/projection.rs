//! The contract between the engine and a projection.
//!
//! A projection is a fold: for each event it names the key whose state the event
//! changes, and computes that key's new state from the old one. The engine owns
//! everything else: ordering, batching, storage, offsets, serving. State is kept
//! per source partition (DESIGN.md invariant 2), so a key fed from several
//! partitions has several partial states, and [`Projection::merge`] combines them
//! on read.

use std::collections::BTreeMap;
use std::sync::Arc;

use apache_avro::types::Value as AvroValue;
use serde_json::Value as Json;

/// Where an event was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventMeta {
    /// Source topic.
    pub topic: Arc<str>,
    /// Source partition.
    pub partition: i32,
    /// Offset in the partition.
    pub offset: i64,
    /// Kafka record timestamp, milliseconds since the epoch, when the record has one.
    pub timestamp_ms: Option<i64>,
    /// The record's key, when it has one (as text; invalid UTF-8 replaced).
    pub key: Option<Arc<str>>,
}

/// One decoded event, in the current version of its schema.
#[derive(Debug)]
pub struct Event<'a> {
    /// Full Avro name of the event type, e.g. `shop.orders.OrderPlaced`.
    pub name: &'a str,
    /// The payload, an Avro record.
    pub payload: &'a AvroValue,
    /// Where it came from.
    pub meta: &'a EventMeta,
}

impl Event<'_> {
    /// Deserializes the payload into a typed struct (field names as in the schema).
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, FoldError> {
        apache_avro::from_value(self.payload)
            .map_err(|e| FoldError(format!("{} does not have the expected shape: {e}", self.name)))
    }
}

/// A fold that could not be computed; goes to the projection's poison policy with
/// reason `fold_failed`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FoldError(pub String);

/// The partial states of one source partition, as a fold sees and changes them.
/// Changes are buffered in the batch and committed with its offsets.
pub trait PartitionState {
    /// A copy of `key`'s partial state in this partition.
    fn get(&mut self, key: &str) -> Result<Option<Json>, FoldError>;

    /// Changes `key`'s partial state in place (`None`: it has none; setting `None`
    /// deletes it).
    fn update(
        &mut self,
        key: &str,
        change: &mut dyn FnMut(&mut Option<Json>) -> Result<(), FoldError>,
    ) -> Result<(), FoldError>;
}

/// Partial states of one partition held in a map: for unit tests and benchmarks
/// of projections, without RocksDB. A failed change is kept as the projection left
/// it, so a test sees a projection that breaks the "validate before mutating"
/// contract.
#[derive(Debug, Default)]
pub struct InMemoryState(pub std::collections::HashMap<String, Json>);

impl PartitionState for InMemoryState {
    fn get(&mut self, key: &str) -> Result<Option<Json>, FoldError> {
        Ok(self.0.get(key).cloned())
    }

    fn update(
        &mut self,
        key: &str,
        change: &mut dyn FnMut(&mut Option<Json>) -> Result<(), FoldError>,
    ) -> Result<(), FoldError> {
        let mut current = self.0.remove(key);
        let outcome = change(&mut current);
        if let Some(value) = current {
            self.0.insert(key.to_owned(), value);
        }
        outcome
    }
}

/// A read model maintained from events.
///
/// Implementations must be deterministic: the same events in the same order give the
/// same state, so that a replay rebuilds exactly what was there. When `apply` fails
/// it must not have changed anything: validate the event before the first update.
pub trait Projection: Send + Sync {
    /// Folds `event` into the partial states of its source partition.
    fn apply(&self, event: &Event<'_>, state: &mut dyn PartitionState) -> Result<(), FoldError>;

    /// Combines the partial states of `key`, one per source partition, into the
    /// value served to readers; `None` hides the key (internal bookkeeping). Called
    /// only with at least one partial. An error (a sum that overflows) is answered
    /// as one, never as a wrong value.
    fn merge(&self, key: &str, partials: Vec<Json>) -> Result<Option<Json>, FoldError>;
}

/// The common shape: each event changes at most one key. Every `Entity` is a
/// [`Projection`].
pub trait Entity: Send + Sync {
    /// The key whose state `event` changes, or `None` when the projection ignores it.
    fn key(&self, event: &Event<'_>) -> Result<Option<String>, FoldError>;

    /// Folds `event` into `state` (`None` when the key has no state in this source
    /// partition yet). Setting `*state = None` deletes the key. On error `state`
    /// must be left as it was.
    fn fold(&self, state: &mut Option<Json>, event: &Event<'_>) -> Result<(), FoldError>;

    /// Combines the partial states of one key (see [`Projection::merge`]).
    fn merge(&self, key: &str, partials: Vec<Json>) -> Result<Option<Json>, FoldError>;
}

impl<T: Entity> Projection for T {
    fn apply(&self, event: &Event<'_>, state: &mut dyn PartitionState) -> Result<(), FoldError> {
        let Some(key) = self.key(event)? else {
            return Ok(());
        };
        state.update(&key, &mut |current| self.fold(current, event))
    }

    fn merge(&self, key: &str, partials: Vec<Json>) -> Result<Option<Json>, FoldError> {
        Entity::merge(self, key, partials)
    }
}

/// Why a built-in projection refused its `[projections.options]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct OptionsError(pub String);

impl From<serde_json::Error> for OptionsError {
    fn from(error: serde_json::Error) -> Self {
        OptionsError(error.to_string())
    }
}

/// Builds a projection from its `[projections.options]`; the error says what is wrong
/// with the options.
pub type ProjectionFactory = fn(&Json) -> Result<Box<dyn Projection>, OptionsError>;

/// Built-in projections by kind name; the `projections` crate provides one.
pub type ProjectionRegistry = BTreeMap<&'static str, ProjectionFactory>;
