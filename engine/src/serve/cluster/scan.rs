//! Key scans in multi-worker mode: every worker serving some partitions scans
//! them (`GET /cluster/projections/{name}/scan`, with the cluster secret) and
//! the asking worker merges the pages in key order. Each worker returns at most
//! `limit` keys; where one stopped at the limit, keys after its last may be
//! missing from the others' pages, so the merged page ends there and its `next`
//! cursor resumes from it: the same cursor semantics as on a worker alone.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{
    ask, between_workers, every_partition, format_positions, not_served, plan, unavailable_answer, Ask, Plan,
};
use crate::cluster::Cluster;
use crate::fold_state::Fold;
use crate::serve::as_of::Refusal;
use crate::serve::{as_of_offsets, internal, parse_positions, ApiError, ApiPath, ApiQuery, ApiState};
use crate::store::{SourcePartition, Store};
use crate::supervisor::Supervisor;

/// One worker's page of a scan over some partitions.
#[derive(Debug, Serialize, Deserialize)]
pub(in crate::serve) struct ScanAnswer {
    /// The worker that answers.
    #[serde(default)]
    worker: String,
    generation: u64,
    /// Keys in order, each with its partial states in those partitions (base64).
    keys: Vec<(String, Vec<String>)>,
    /// Stopped at the limit: keys after the last may follow.
    truncated: bool,
    /// Next offset of each partition scanned.
    offsets: BTreeMap<String, i64>,
    /// Partitions asked for that it cannot answer for, each with the reason.
    unavailable: Vec<String>,
}

/// Query of a forwarded scan.
#[derive(Deserialize)]
pub(in crate::serve) struct ScanPartsQuery {
    partitions: String,
    #[serde(default)]
    prefix: String,
    after: Option<String>,
    limit: usize,
}

/// What a page covers.
struct Page<'a> {
    prefix: &'a str,
    after: Option<&'a str>,
    limit: usize,
}

/// This worker's page over `partitions` (which it must serve).
fn local_scan(
    store: &Store,
    cluster: &Cluster,
    fold: &Fold,
    partitions: &[SourcePartition],
    page: &Page<'_>,
) -> Result<ScanAnswer, ApiError> {
    let mut answer = ScanAnswer {
        worker: cluster.worker_id.clone(),
        generation: fold.generation.number,
        keys: Vec::new(),
        truncated: false,
        offsets: BTreeMap::new(),
        unavailable: partitions
            .iter()
            .filter_map(|p| not_served(cluster, fold, p))
            .collect(),
    };
    if !answer.unavailable.is_empty() {
        return Ok(answer);
    }
    let only: BTreeSet<SourcePartition> = partitions.iter().cloned().collect();
    let view = store.read_view(&fold.generation).map_err(internal)?;
    let found = view
        .scan(page.prefix, page.after, page.limit, Some(&only), &mut |_, _| true)
        .map_err(internal)?;
    answer.truncated = found.len() == page.limit;
    let encoder = base64::engine::general_purpose::STANDARD;
    answer.keys = found
        .into_iter()
        .map(|(key, partials, _)| (key, partials.iter().map(|b| encoder.encode(b)).collect()))
        .collect();
    let offsets = view.offsets().map_err(internal)?;
    answer.offsets = partitions
        .iter()
        .map(|p| (p.to_string(), offsets.get(p).copied().unwrap_or(0)))
        .collect();
    Ok(answer)
}

/// `GET /cluster/projections/{name}/scan`: this worker's page over the
/// partitions asked for (another worker merges it into a scan).
pub(in crate::serve) async fn scan_parts(
    State(state): State<ApiState>,
    headers: HeaderMap,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<ScanPartsQuery>,
) -> Result<Json<ScanAnswer>, ApiError> {
    let cluster = between_workers(&state, &headers)?;
    let live = state.projection(&name)?.live();
    let partitions: Vec<SourcePartition> = parse_positions(&query.partitions, false)?.into_keys().collect();
    let limit = query.limit.clamp(1, crate::serve::scan::MAX_SCAN_LIMIT);
    let _permit = state.scans.clone().acquire_owned().await.map_err(internal)?;
    let store = state.store.clone();
    tokio::task::spawn_blocking(move || {
        let page = Page {
            prefix: &query.prefix,
            after: query.after.as_deref(),
            limit,
        };
        local_scan(&store, &cluster, &live, &partitions, &page).map(Json)
    })
    .await
    .map_err(internal)?
}

/// `GET /projections/{name}/state?prefix=&after=&limit=` in multi-worker mode.
pub(in crate::serve) async fn routed_scan(
    state: &ApiState,
    cluster: &Arc<Cluster>,
    projection: &Arc<Supervisor>,
    prefix: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<Json<Value>, Refusal> {
    let name = &projection.name;
    let live = projection.live();
    let wanted = every_partition(cluster, &live.topics)?;
    let Plan { local, remote } = plan(cluster, projection, &live, wanted.clone())?;
    let mut asks = tokio::task::JoinSet::new();
    for (owner, partitions) in remote {
        let partitions = format_positions(partitions.iter().map(|p| (p, 0)), false);
        let mut query = vec![
            ("partitions", partitions.clone()),
            ("prefix", prefix.to_owned()),
            ("limit", limit.to_string()),
        ];
        if let Some(after) = after {
            query.push(("after", after.to_owned()));
        }
        let path = ["cluster", "projections", name, "scan"]
            .map(str::to_owned)
            .to_vec();
        asks.spawn(ask::<ScanAnswer>(
            cluster.clone(),
            owner,
            Ask {
                path,
                query,
                partitions,
            },
        ));
    }
    let mut answers = Vec::new();
    let mut unavailable = Vec::new();
    if !local.is_empty() {
        let _permit = state.scans.clone().acquire_owned().await.map_err(internal)?;
        let (store, cluster, live) = (state.store.clone(), cluster.clone(), live.clone());
        let (prefix, after) = (prefix.to_owned(), after.map(str::to_owned));
        let answer = tokio::task::spawn_blocking(move || {
            let page = Page {
                prefix: &prefix,
                after: after.as_deref(),
                limit,
            };
            local_scan(&store, &cluster, &live, &local, &page)
        })
        .await
        .map_err(internal)??;
        answers.push(answer);
    }
    while let Some(asked) = asks.join_next().await {
        match asked {
            Ok(Ok(answer)) => answers.push(answer),
            Ok(Err(why)) => unavailable.push(why),
            Err(e) => unavailable.push(format!("asking another worker: {e}")),
        }
    }
    let mut keys: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    // Keys up to here are complete in every page; after it, a page that
    // stopped at the limit may be missing some.
    let mut complete_until: Option<String> = None;
    let mut offsets = BTreeMap::new();
    let decoder = base64::engine::general_purpose::STANDARD;
    for answer in answers {
        unavailable.extend(answer.unavailable);
        if answer.generation != live.generation.number {
            unavailable.push(format!(
                "{}: generation {} on worker {}, {} on worker {}",
                answer.offsets.keys().cloned().collect::<Vec<_>>().join(","),
                answer.generation,
                answer.worker,
                live.generation.number,
                cluster.worker_id
            ));
            continue;
        }
        if answer.truncated {
            if let Some((last, _)) = answer.keys.last() {
                if complete_until.as_ref().is_none_or(|until| last < until) {
                    complete_until = Some(last.clone());
                }
            }
        }
        for (key, partials) in answer.keys {
            let entry = keys.entry(key.clone()).or_default();
            for partial in partials {
                entry.push(decoder.decode(partial).map_err(|e| {
                    internal(format!(
                        "a partial state of `{key}` from worker {}: {e}",
                        answer.worker
                    ))
                })?);
            }
        }
        for (partition, next) in answer.offsets {
            match parse_positions(&partition, false) {
                Ok(parsed) => offsets.extend(parsed.into_keys().map(|p| (p, next))),
                Err(_) => unavailable.push(format!(
                    "worker {} answered for `{partition}`, which is not a partition",
                    answer.worker
                )),
            }
        }
    }
    unavailable.extend(super::unanswered(&wanted, &offsets));
    if !unavailable.is_empty() {
        return Err(unavailable_answer(name, unavailable));
    }
    let mut items = Vec::new();
    let mut next = None;
    for (key, partials) in keys {
        if complete_until.as_ref().is_some_and(|until| key > *until) {
            break;
        }
        let merged = live
            .projection
            .merge_stored(&key, &partials)
            .map_err(|e| internal(format!("merging the partial states of `{key}`: {e}")))?;
        if let Some(value) = merged {
            items.push(json!({ "key": key, "value": value }));
            if items.len() == limit {
                next = Some(key);
                break;
            }
        }
    }
    if next.is_none() {
        next = complete_until;
    }
    Ok(Json(json!({
        "items": items,
        "next": next,
        "as_of": as_of_offsets(offsets),
    })))
}
