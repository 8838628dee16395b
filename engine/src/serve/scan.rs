//! `GET /projections/{name}/state?prefix=&after=&limit=&at=`: keys in order,
//! from one RocksDB snapshot, a bounded number of scans at once.

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use super::{as_of, as_of_offsets, internal, ApiError, ApiPath, ApiQuery, ApiState};
use crate::store::Store;

/// Query of a scan.
#[derive(serde::Deserialize)]
pub(super) struct ScanQuery {
    #[serde(default)]
    prefix: String,
    after: Option<String>,
    limit: Option<usize>,
    /// An as-of generation's time.
    at: Option<String>,
}

/// Most keys one scan returns.
pub(super) const MAX_SCAN_LIMIT: usize = 1000;

pub(super) async fn scan_keys(
    State(state): State<ApiState>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<ScanQuery>,
) -> Result<Json<Value>, as_of::Refusal> {
    let projection = state.projection(&name)?;
    let limit = query.limit.unwrap_or(100).clamp(1, MAX_SCAN_LIMIT);
    if let (Some(cluster), None) = (&state.cluster, &query.at) {
        let after = query.after.as_deref();
        return super::cluster::routed_scan(&state, cluster, projection, &query.prefix, after, limit).await;
    }
    let (live, until) = as_of::resolve(&state.store, &name, projection, query.at.as_deref())?;
    // A scan reads and merges up to `limit` keys: a bounded number run at once,
    // off the async threads; the others wait within the request timeout.
    let _permit = state.scans.clone().acquire_owned().await.map_err(internal)?;
    let store = state.store.clone();
    let Json(mut page) = tokio::task::spawn_blocking(move || scan(&store, &live, &query, limit))
        .await
        .map_err(internal)??;
    if let Some(until) = until {
        page["until"] = json!(until);
    }
    Ok(Json(page))
}

fn scan(
    store: &Store,
    live: &crate::fold_state::Fold,
    query: &ScanQuery,
    limit: usize,
) -> Result<Json<Value>, ApiError> {
    let view = store.read_view(&live.generation).map_err(internal)?;
    let mut items = Vec::new();
    let mut failed = None;
    let found = view
        .scan(
            &query.prefix,
            query.after.as_deref(),
            limit,
            None,
            &mut |key, partials| match live.projection.merge_stored(key, partials) {
                Ok(Some(value)) => {
                    items.push(json!({ "key": key, "value": value }));
                    true
                }
                Ok(None) => false,
                Err(e) => {
                    failed.get_or_insert_with(|| format!("merging the partial states of `{key}`: {e}"));
                    false
                }
            },
        )
        .map_err(internal)?;
    if let Some(error) = failed {
        return Err(internal(error));
    }
    let next = (found.len() == limit)
        .then(|| found.last().map(|(k, _, _)| k.clone()))
        .flatten();
    Ok(Json(json!({
        "items": items,
        "next": next,
        "as_of": as_of_offsets(view.offsets().map_err(internal)?),
    })))
}
