//! The contract between the engine and a projection.
//!
//! A projection is a fold: for each event it names the key whose state the event
//! changes, and computes that key's new state from the old one. The engine owns
//! everything else: ordering, batching, storage, offsets, serving. State is kept
//! per source partition (DESIGN.md invariant 2), so a key fed from several
//! partitions has several partial states, and [`Projection::merge`] combines them
//! on read.

use std::any::Any;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use apache_avro::types::Value as AvroValue;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value as Json;

use crate::state_codec;

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

/// A partial state between folds: the projection's own value, opaque to the
/// engine, which keeps it in memory across batches and writes it with
/// [`Projection::encode`]. An [`Entity`]'s is its `State` type; a
/// [`Projection`] that keeps the defaults uses a JSON value.
pub type State = Box<dyn Any + Send>;

/// The partial states of one source partition, as a fold sees and changes them.
/// Changes are buffered in the batch and committed with its offsets.
pub trait PartitionState {
    /// `key`'s partial state in this partition, to read.
    fn get(&mut self, key: &str) -> Result<Option<&State>, FoldError>;

    /// Changes `key`'s partial state in place (`None`: it has none; setting `None`
    /// deletes it).
    fn update(
        &mut self,
        key: &str,
        change: &mut dyn FnMut(&mut Option<State>) -> Result<(), FoldError>,
    ) -> Result<(), FoldError>;
}

/// Partial states of one partition held in a map: for unit tests and benchmarks
/// of projections, without RocksDB. A failed change is kept as the projection left
/// it, so a test sees a projection that breaks the "validate before mutating"
/// contract.
#[derive(Default)]
pub struct InMemoryState(pub hashbrown::HashMap<String, State>);

impl PartitionState for InMemoryState {
    fn get(&mut self, key: &str) -> Result<Option<&State>, FoldError> {
        Ok(self.0.get(key))
    }

    fn update(
        &mut self,
        key: &str,
        change: &mut dyn FnMut(&mut Option<State>) -> Result<(), FoldError>,
    ) -> Result<(), FoldError> {
        let (key, mut current) = match self.0.remove_entry(key) {
            Some((owned, state)) => (owned, Some(state)),
            None => (key.to_owned(), None),
        };
        let outcome = change(&mut current);
        if let Some(value) = current {
            self.0.insert(key, value);
        }
        outcome
    }
}

/// A read model maintained from events.
///
/// Implementations must be deterministic: the same events in the same order give the
/// same state, so that a replay rebuilds exactly what was there. When `apply` fails
/// it must not have changed anything: validate the event before the first update.
///
/// States are JSON values unless `encode` and `decode` say otherwise (an [`Entity`]
/// uses its typed state and [`state_codec`]).
pub trait Projection: Send + Sync {
    /// Folds `event` into the partial states of its source partition.
    fn apply(&self, event: &Event<'_>, state: &mut dyn PartitionState) -> Result<(), FoldError>;

    /// Combines the partial states of `key`, one per source partition, into the
    /// value served to readers; `None` hides the key (internal bookkeeping). Called
    /// only with at least one partial. An error (a sum that overflows) is answered
    /// as one, never as a wrong value.
    fn merge(&self, key: &str, partials: Vec<State>) -> Result<Option<Json>, FoldError>;

    /// The bytes a partial state is stored as.
    fn encode(&self, state: &State) -> Result<Vec<u8>, FoldError> {
        serde_json::to_vec(as_json(state)?).map_err(|e| FoldError(format!("encoding a state: {e}")))
    }

    /// A stored partial state, from any format this projection has written.
    fn decode(&self, bytes: &[u8]) -> Result<State, FoldError> {
        serde_json::from_slice::<Json>(bytes)
            .map(|json| Box::new(json) as State)
            .map_err(|e| FoldError(format!("a stored state is not JSON: {e}")))
    }

    /// [`Projection::merge`] of stored partial states.
    fn merge_stored(&self, key: &str, rows: &[Vec<u8>]) -> Result<Option<Json>, FoldError> {
        let partials = rows
            .iter()
            .map(|row| self.decode(row))
            .collect::<Result<Vec<_>, _>>()?;
        self.merge(key, partials)
    }
}

/// A JSON state, as projections that keep the default codec hold them.
pub fn as_json(state: &State) -> Result<&Json, FoldError> {
    state
        .downcast_ref::<Json>()
        .ok_or_else(|| FoldError("the state is not a JSON value".to_owned()))
}

/// Changes `key`'s JSON state in place (see [`PartitionState::update`]).
pub fn update_json(
    state: &mut dyn PartitionState,
    key: &str,
    change: &mut dyn FnMut(&mut Option<Json>) -> Result<(), FoldError>,
) -> Result<(), FoldError> {
    state.update(key, &mut |current| {
        let mut json = current.take().map(into_json).transpose()?;
        let outcome = change(&mut json);
        *current = json.map(|j| Box::new(j) as State);
        outcome
    })
}

/// A JSON state, unboxed.
pub fn into_json(state: State) -> Result<Json, FoldError> {
    state
        .downcast::<Json>()
        .map(|json| *json)
        .map_err(|_| FoldError("the state is not a JSON value".to_owned()))
}

/// The common shape: each event changes at most one key, whose state is a typed
/// value. Every `Entity` is a [`Projection`], stored with [`state_codec`].
pub trait Entity: Send + Sync {
    /// One key's partial state.
    type State: Serialize + DeserializeOwned + Send + 'static;

    /// The key whose state `event` changes, or `None` when the projection ignores
    /// it; borrowed from the event when it is one of its fields, so folding it
    /// allocates nothing.
    fn key<'e>(&self, event: &Event<'e>) -> Result<Option<Cow<'e, str>>, FoldError>;

    /// Folds `event` into `state` (`None` when the key has no state in this source
    /// partition yet). Setting `*state = None` deletes the key. On error `state`
    /// must be left as it was.
    fn fold(&self, state: &mut Option<Self::State>, event: &Event<'_>) -> Result<(), FoldError>;

    /// Combines the partial states of one key (see [`Projection::merge`]).
    fn merge(&self, key: &str, partials: Vec<Self::State>) -> Result<Option<Json>, FoldError>;
}

/// `state` as an entity's state type.
fn unbox<S: 'static>(state: State) -> Result<S, FoldError> {
    state
        .downcast::<S>()
        .map(|typed| *typed)
        .map_err(|_| FoldError("the state is not of this projection's type".to_owned()))
}

impl<T: Entity> Projection for T {
    fn apply(&self, event: &Event<'_>, state: &mut dyn PartitionState) -> Result<(), FoldError> {
        let Some(key) = self.key(event)? else {
            return Ok(());
        };
        state.update(&key, &mut |current| {
            let mut typed = current.take().map(unbox::<T::State>).transpose()?;
            let outcome = self.fold(&mut typed, event);
            *current = typed.map(|t| Box::new(t) as State);
            outcome
        })
    }

    fn merge(&self, key: &str, partials: Vec<State>) -> Result<Option<Json>, FoldError> {
        let typed = partials
            .into_iter()
            .map(unbox::<T::State>)
            .collect::<Result<Vec<_>, _>>()?;
        Entity::merge(self, key, typed)
    }

    fn encode(&self, state: &State) -> Result<Vec<u8>, FoldError> {
        let typed = state
            .downcast_ref::<T::State>()
            .ok_or_else(|| FoldError("the state is not of this projection's type".to_owned()))?;
        Ok(state_codec::encode(typed)?)
    }

    fn decode(&self, bytes: &[u8]) -> Result<State, FoldError> {
        Ok(state_codec::decode::<T::State>(bytes).map(|typed| Box::new(typed) as State)?)
    }
}

impl From<state_codec::CodecError> for FoldError {
    fn from(error: state_codec::CodecError) -> Self {
        FoldError(error.0)
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
