//! `GET /projections/{name}/state/{key}`: a key's value merged over its
//! source partitions from one snapshot (routed to the owners in multi-worker
//! mode, see [`super::cluster`]), optionally waiting for `min_as_of`.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use super::{
    as_of, as_of_offsets, cluster, internal, merged_value, parse_positions, ApiPath, ApiQuery, ApiState,
};
use crate::store::Store;

/// Query of a key read: `at` names an as-of generation by its time;
/// `min_as_of` (`topic/partition:offset,...`) waits, within
/// [`MIN_AS_OF_WAIT`], until the answer reflects the records at those offsets
/// (a client that knows where its own writes went reads them).
#[derive(serde::Deserialize)]
pub(super) struct ReadQuery {
    at: Option<String>,
    min_as_of: Option<String>,
}

/// How long a read waits for its `min_as_of` on a worker alone.
const MIN_AS_OF_WAIT: std::time::Duration = std::time::Duration::from_millis(2_500);

/// Waits until `generation` has folded the records at the offsets of `min`;
/// 503 naming the partitions behind when the wait is over.
async fn wait_for_offsets(
    store: &Store,
    generation: &crate::store::Generation,
    min: &BTreeMap<crate::store::SourcePartition, i64>,
) -> Result<(), as_of::Refusal> {
    let deadline = std::time::Instant::now() + MIN_AS_OF_WAIT;
    loop {
        let offsets = store.offsets(generation).map_err(internal)?;
        let behind: Vec<String> = min
            .iter()
            .filter_map(|(p, want)| {
                let at = offsets.get(p).copied().unwrap_or(0);
                (at <= *want).then(|| format!("{p}: next offset {at}, offset {want} not folded yet"))
            })
            .collect();
        if behind.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(as_of::Refusal::unavailable(json!({
                "error": "the state does not reflect min_as_of yet",
                "unavailable": behind,
            })));
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

pub(super) async fn read_key(
    State(state): State<ApiState>,
    ApiPath((name, key)): ApiPath<(String, String)>,
    ApiQuery(query): ApiQuery<ReadQuery>,
) -> Result<Json<Value>, as_of::Refusal> {
    let projection = state.projection(&name)?;
    let min = parse_positions(query.min_as_of.as_deref().unwrap_or_default(), true)?;
    if let (Some(cluster), None) = (&state.cluster, &query.at) {
        return cluster::routed_read(&state, cluster, projection, &key, &min).await;
    }
    // One fold for the whole request: its generation and the merge that goes with it.
    let (live, until) = as_of::resolve(&state.store, &name, projection, query.at.as_deref())?;
    wait_for_offsets(&state.store, &live.generation, &min).await?;
    let view = state.store.read_view(&live.generation).map_err(internal)?;
    let partials = view.partials(&key).map_err(internal)?;
    let mut value = merged_value(&live, &name, &key, &partials)?;
    if let Value::Object(fields) = &mut value {
        fields.insert("as_of".into(), as_of_offsets(view.offsets().map_err(internal)?));
        if let Some(until) = until {
            fields.insert("until".into(), json!(until));
        }
    }
    Ok(Json(value))
}
