//! `POST`/`DELETE /projections/{name}/replay` and the replay fields of
//! `GET /projections/{name}` in multi-worker mode: one replay for the whole
//! deployment, recorded in the cluster topic (`cluster::replays`).

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::super::{internal, ApiError};
use crate::cluster::topic::{now_ms, partition_names};
use crate::cluster::{replays, Cluster, ReplayRecord, ReplayState};
use crate::supervisor::Supervisor;

/// How long a request waits for this worker's view of the cluster topic to
/// catch up, before and after writing.
const VIEW_WAIT: Duration = Duration::from_secs(5);

/// The view holds every record the cluster topic had when asked (a request on
/// another worker just before this one is seen), else 503.
async fn current_view(cluster: &Arc<Cluster>) -> Result<(), ApiError> {
    let asked = cluster.clone();
    let current = tokio::task::spawn_blocking(move || asked.catch_up_view(VIEW_WAIT))
        .await
        .map_err(internal)?;
    if current {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "this worker has not read the cluster topic `{}` up to its end; try again",
                cluster.topic
            ),
        ))
    }
}

/// Waits (up to a few seconds) until this worker has read the cluster topic to
/// its end since it started, so the replay fields it shows are the
/// deployment's (a worker restarted mid-replay would otherwise show none).
pub(in crate::serve) async fn view_read(cluster: Option<&Arc<Cluster>>) {
    let Some(cluster) = cluster else {
        return;
    };
    let deadline = tokio::time::Instant::now() + VIEW_WAIT;
    while !cluster.view_current() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Writes `record` and waits until this worker's view shows it.
async fn write(cluster: &Arc<Cluster>, record: &ReplayRecord) -> Result<(), ApiError> {
    let offset = cluster
        .write_replay(record)
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e))?;
    let waiting = cluster.clone();
    tokio::task::spawn_blocking(move || waiting.wait_for_view(offset, VIEW_WAIT))
        .await
        .map_err(internal)?;
    Ok(())
}

/// The replay's status over every worker.
pub(in crate::serve) fn status(cluster: &Cluster, projection: &Supervisor, record: &ReplayRecord) -> Value {
    let topics = crate::config::definition_topics(&projection.configured_definition);
    let workers: Vec<_> = cluster.workers().into_iter().map(|(r, _)| r).collect();
    replays::status(record, &workers, &partition_names(cluster, &topics))
}

/// `replay` and `last_replay` of `GET /projections/{name}`: the deployment's.
pub(in crate::serve) fn describe(cluster: &Cluster, projection: &Supervisor) -> (Value, Value) {
    match cluster.replay_of(&projection.name) {
        Some(record) if record.state.running() => (status(cluster, projection, &record), json!(null)),
        Some(record) => (
            json!(null),
            json!({
                "generation": record.generation,
                "outcome": record.state.as_str(),
                "ended_at": record.updated_at_ms / 1000,
                "across_workers": true,
            }),
        ),
        // No replay across workers yet, or this worker has not read the
        // topic since it started: what it knows itself (a replay it resumed).
        None => (json!(projection.replay_status()), json!(projection.last_replay())),
    }
}

/// Starts one replay for the deployment: 202, or 409 with the running one's
/// status (whichever worker it was requested on).
pub(in crate::serve) async fn start(
    cluster: &Arc<Cluster>,
    projection: &Arc<Supervisor>,
) -> Result<Response, ApiError> {
    current_view(cluster).await?;
    let name = &projection.name;
    let last = cluster.replay_of(name);
    if let Some(running) = last.as_ref().filter(|r| r.state.running()) {
        return Ok((
            StatusCode::CONFLICT,
            Json(json!({
                "error": format!("a replay of `{name}` is running already (requested on worker {})",
                    running.requested_on),
                "replay": status(cluster, projection, running),
            })),
        )
            .into_response());
    }
    // One above every generation any worker has or had of this projection.
    let highest = cluster
        .workers()
        .iter()
        .filter_map(|(w, _)| w.projections.get(name))
        .flat_map(|c| std::iter::once(c.generation).chain(c.replay.as_ref().map(|r| r.generation)))
        .chain(last.map(|r| r.generation))
        .chain(std::iter::once(projection.live().generation.number))
        .chain(projection.replay().map(|r| r.fold.generation.number))
        .max()
        .unwrap_or(1);
    let now = now_ms();
    let record = ReplayRecord {
        projection: name.clone(),
        generation: highest.saturating_add(1),
        state: ReplayState::Running,
        requested_on: cluster.worker_id.clone(),
        started_at_ms: now,
        updated_at_ms: now,
        targets: Default::default(),
    };
    write(cluster, &record).await?;
    tracing::warn!(projection = %name, generation = record.generation, "operator started a replay across workers");
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "replay": status(cluster, projection, &record) })),
    )
        .into_response())
}

/// Aborts the deployment's running replay: every worker drops its share.
pub(in crate::serve) async fn abort(
    cluster: &Arc<Cluster>,
    projection: &Arc<Supervisor>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    current_view(cluster).await?;
    let name = &projection.name;
    let Some(mut record) = cluster.replay_of(name).filter(|r| r.state.running()) else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no replay of `{name}` is running"),
        ));
    };
    record.state = ReplayState::Aborted;
    record.updated_at_ms = now_ms();
    write(cluster, &record).await?;
    tracing::warn!(projection = %name, generation = record.generation, "operator aborted the replay across workers");
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "aborting": record.generation })),
    ))
}
