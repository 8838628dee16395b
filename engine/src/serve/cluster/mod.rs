//! Reads in multi-worker mode: a key read on any worker is answered from the
//! partial states of every partition it needs, read here for the partitions
//! this worker serves and asked of their owners for the others
//! (`GET /cluster/projections/{name}/partials?key=`, which carries the cluster
//! secret and is answered only from the receiving worker's own partitions, so a
//! forwarded read is never forwarded again). A partition that no worker serves
//! (moving, restoring) makes the answer a 503 naming it: never a partial sum.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::as_of::Refusal;
use super::{as_of_offsets, internal, parse_positions, ApiError, ApiPath, ApiQuery, ApiState};
use crate::cluster::{Cluster, Owner, SECRET_HEADER};
use crate::fold_state::Fold;
use crate::store::SourcePartition;
use crate::supervisor::Supervisor;

pub(super) mod replay;
mod scan;
mod serving;

pub(super) use scan::{routed_scan, scan_parts};
use serving::not_served;

/// What one worker answers for some partitions of one key.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct PartialsAnswer {
    /// The worker that answers.
    #[serde(default)]
    worker: String,
    /// Its live generation.
    generation: u64,
    /// Each partition asked for that it serves: its next offset and the key's
    /// partial state there (base64 of the stored bytes), if any.
    partitions: Vec<PartitionPartial>,
    /// Partitions asked for that it cannot answer for, each with the reason.
    unavailable: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct PartitionPartial {
    topic: String,
    partition: i32,
    next_offset: i64,
    #[serde(default)]
    state: Option<String>,
}

fn format_positions<'a>(
    positions: impl Iterator<Item = (&'a SourcePartition, i64)>,
    with_offsets: bool,
) -> String {
    positions
        .map(|(p, offset)| {
            if with_offsets {
                format!("{p}:{offset}")
            } else {
                p.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// One attempt at answering locally: the answer, or the partitions still
/// behind their `min_as_of`.
enum Attempt {
    Answer(PartialsAnswer),
    Behind(Vec<String>),
}

/// This worker's answer for `partitions` of `key`, waiting up to `wait` until
/// each has folded the record at its `min` offset.
async fn local_partials(
    state: &ApiState,
    cluster: &Cluster,
    fold: &Fold,
    key: &str,
    partitions: &[SourcePartition],
    min: &BTreeMap<SourcePartition, i64>,
    wait: Duration,
) -> Result<PartialsAnswer, ApiError> {
    let deadline = Instant::now() + wait;
    loop {
        let unavailable: Vec<String> = partitions
            .iter()
            .filter_map(|p| not_served(cluster, fold, p))
            .collect();
        if !unavailable.is_empty() {
            return Ok(PartialsAnswer {
                worker: cluster.worker_id.clone(),
                generation: fold.generation.number,
                partitions: Vec::new(),
                unavailable,
            });
        }
        let attempt = {
            let view = state.store.read_view(&fold.generation).map_err(internal)?;
            let offsets = view.offsets().map_err(internal)?;
            let next = |p: &SourcePartition| offsets.get(p).copied().unwrap_or(0);
            let behind: Vec<String> = partitions
                .iter()
                .filter_map(|p| {
                    let want = *min.get(p)?;
                    (next(p) <= want)
                        .then(|| format!("{p}: next offset {}, offset {want} not folded yet", next(p)))
                })
                .collect();
            if behind.is_empty() {
                let rows = view.partials_by_partition(key).map_err(internal)?;
                let encoder = base64::engine::general_purpose::STANDARD;
                Attempt::Answer(PartialsAnswer {
                    worker: cluster.worker_id.clone(),
                    generation: fold.generation.number,
                    partitions: partitions
                        .iter()
                        .map(|p| PartitionPartial {
                            topic: p.topic.to_string(),
                            partition: p.partition,
                            next_offset: next(p),
                            state: rows
                                .iter()
                                .find(|(row, _)| row == p)
                                .map(|(_, bytes)| encoder.encode(bytes)),
                        })
                        .collect(),
                    unavailable: Vec::new(),
                })
            } else {
                Attempt::Behind(behind)
            }
        };
        match attempt {
            Attempt::Answer(answer) => return Ok(answer),
            Attempt::Behind(behind) if Instant::now() >= deadline => {
                return Ok(PartialsAnswer {
                    worker: cluster.worker_id.clone(),
                    generation: fold.generation.number,
                    partitions: Vec::new(),
                    unavailable: behind,
                })
            }
            Attempt::Behind(_) => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }
}

/// The partitions a read of `key` needs: the key's own partition of each topic
/// for a projection keyed like its topics (when the producers' partitioner is
/// known), else every partition. An empty key is read everywhere: librdkafka
/// spreads records with an empty key at random.
fn wanted_partitions(
    cluster: &Cluster,
    projection: &Supervisor,
    topics: &[String],
    key: &str,
) -> Result<Vec<SourcePartition>, Refusal> {
    let mut wanted = every_partition(cluster, topics)?;
    if projection.keyed_like_topic && !key.is_empty() {
        wanted.retain(|p| {
            let count = cluster.partition_count(&p.topic).unwrap_or(0);
            cluster
                .partitioner
                .partition(key.as_bytes(), count)
                .is_none_or(|own| own == p.partition)
        });
    }
    Ok(wanted)
}

/// A request to another worker: the path under its URL and the query.
struct Ask {
    path: Vec<String>,
    query: Vec<(&'static str, String)>,
    /// The partitions asked for, as errors name them.
    partitions: String,
}

/// Asks `owner`; an error says why it did not answer.
async fn ask<T: serde::de::DeserializeOwned>(
    cluster: Arc<Cluster>,
    owner: Owner,
    request: Ask,
) -> Result<T, String> {
    let failed = |why: String| format!("{}: worker {} {why}", request.partitions, owner.worker_id);
    let mut url = reqwest::Url::parse(&owner.url).map_err(|e| failed(format!("has a bad URL: {e}")))?;
    url.path_segments_mut()
        .map_err(|()| failed("has a URL that cannot take a path".into()))?
        .pop_if_empty()
        .extend(&request.path);
    let response = cluster
        .http
        .get(url)
        .query(&request.query)
        .header(SECRET_HEADER, cluster.secret())
        .send()
        .await
        .map_err(|e| failed(format!("did not answer: {e}")))?;
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        return Err(failed(format!("answered {status}: {}", body.trim())));
    }
    response
        .json::<T>()
        .await
        .map_err(|e| failed(format!("answered what this worker cannot read: {e}")))
}

/// Who answers for which partitions: this worker for those it serves, the
/// owners the cluster topic names for the others.
struct Plan {
    local: Vec<SourcePartition>,
    remote: BTreeMap<Owner, Vec<SourcePartition>>,
}

fn plan(
    cluster: &Cluster,
    projection: &Supervisor,
    live: &Fold,
    wanted: Vec<SourcePartition>,
) -> Result<Plan, Refusal> {
    let mut plan = Plan {
        local: Vec::new(),
        remote: BTreeMap::new(),
    };
    let mut unavailable = Vec::new();
    for partition in wanted {
        match not_served(cluster, live, &partition) {
            None => plan.local.push(partition),
            Some(here) => match cluster.owner_of(&projection.name, &partition) {
                Some(owner) => plan.remote.entry(owner).or_default().push(partition),
                None => unavailable.push(format!("{here}; no other worker serves it now")),
            },
        }
    }
    if unavailable.is_empty() {
        Ok(plan)
    } else {
        Err(unavailable_answer(&projection.name, unavailable))
    }
}

/// Every partition of `topics`.
fn every_partition(cluster: &Cluster, topics: &[String]) -> Result<Vec<SourcePartition>, Refusal> {
    let mut wanted = Vec::new();
    for topic in topics {
        let count = cluster.partition_count(topic).ok_or_else(|| {
            Refusal::unavailable(json!({
                "error": format!("the partitions of `{topic}` are not known yet"),
            }))
        })?;
        wanted.extend((0..count).map(|partition| SourcePartition {
            topic: topic.as_str().into(),
            partition,
        }));
    }
    Ok(wanted)
}

/// `GET /projections/{name}/state/{key}` in multi-worker mode.
pub(super) async fn routed_read(
    state: &ApiState,
    cluster: &Arc<Cluster>,
    projection: &Arc<Supervisor>,
    key: &str,
    min: &BTreeMap<SourcePartition, i64>,
) -> Result<Json<Value>, Refusal> {
    let name = &projection.name;
    let live = projection.live();
    let wanted = wanted_partitions(cluster, projection, &live.topics, key)?;
    let Plan { local, remote } = plan(cluster, projection, &live, wanted.clone())?;
    let mut unavailable = Vec::new();
    let mut asks = tokio::task::JoinSet::new();
    for (owner, partitions) in remote {
        let min_as_of = format_positions(
            min.iter()
                .filter(|(p, _)| partitions.contains(p))
                .map(|(p, offset)| (p, *offset)),
            true,
        );
        let partitions = format_positions(partitions.iter().map(|p| (p, 0)), false);
        // The key goes in the query: path segments would lose tabs and line
        // breaks, and `.` or `..`.
        let mut query = vec![("partitions", partitions.clone()), ("key", key.to_owned())];
        if !min_as_of.is_empty() {
            query.push(("min_as_of", min_as_of));
        }
        let path = ["cluster", "projections", name, "partials"]
            .map(str::to_owned)
            .to_vec();
        asks.spawn(ask::<PartialsAnswer>(
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
    if !local.is_empty() {
        let wait = cluster.forward_timeout / 2;
        answers.push(local_partials(state, cluster, &live, key, &local, min, wait).await?);
    }
    while let Some(asked) = asks.join_next().await {
        match asked {
            Ok(Ok(answer)) => answers.push(answer),
            Ok(Err(why)) => unavailable.push(why),
            Err(e) => unavailable.push(format!("asking another worker: {e}")),
        }
    }
    let mut rows = Vec::new();
    let mut offsets = BTreeMap::new();
    let decoder = base64::engine::general_purpose::STANDARD;
    for answer in answers {
        unavailable.extend(answer.unavailable);
        if answer.generation != live.generation.number {
            // Generations of one projection differ in definition or progress: a
            // read never mixes them.
            let partitions: Vec<String> = answer
                .partitions
                .iter()
                .map(|p| format!("{}/{}", p.topic, p.partition))
                .collect();
            unavailable.push(format!(
                "{}: generation {} on worker {}, {} on worker {}",
                partitions.join(","),
                answer.generation,
                answer.worker,
                live.generation.number,
                cluster.worker_id
            ));
            continue;
        }
        for partial in answer.partitions {
            let partition = SourcePartition {
                topic: partial.topic.as_str().into(),
                partition: partial.partition,
            };
            if let Some(state) = partial.state {
                let bytes = decoder
                    .decode(state)
                    .map_err(|e| internal(format!("a partial state of `{key}` from {partition}: {e}")))?;
                rows.push(bytes);
            }
            offsets.insert(partition, partial.next_offset);
        }
    }
    unavailable.extend(unanswered(&wanted, &offsets));
    if !unavailable.is_empty() {
        return Err(unavailable_answer(name, unavailable));
    }
    let mut value = super::merged_value(&live, name, key, &rows)?;
    if let Value::Object(fields) = &mut value {
        fields.insert("as_of".into(), as_of_offsets(offsets));
    }
    Ok(Json(value))
}

/// The partitions of `wanted` that no answer covered (a worker that left one
/// out): the answer would be partial.
fn unanswered(wanted: &[SourcePartition], answered: &BTreeMap<SourcePartition, i64>) -> Vec<String> {
    wanted
        .iter()
        .filter(|p| !answered.contains_key(*p))
        .map(|p| format!("{p}: no worker answered for it"))
        .collect()
}

fn unavailable_answer(name: &str, unavailable: Vec<String>) -> Refusal {
    Refusal::unavailable(json!({
        "error": format!("projection `{name}` cannot answer for every partition the read needs yet"),
        "unavailable": unavailable,
    }))
}

/// Query of a forwarded read.
#[derive(Deserialize)]
pub(super) struct PartialsQuery {
    key: String,
    partitions: String,
    #[serde(default)]
    min_as_of: Option<String>,
}

/// `GET /cluster/projections/{name}/partials?key=&partitions=`: this worker's
/// partial states of `key` in the partitions asked for (another worker forwards
/// a read).
pub(super) async fn partials(
    State(state): State<ApiState>,
    headers: HeaderMap,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<PartialsQuery>,
) -> Result<Json<PartialsAnswer>, ApiError> {
    let cluster = between_workers(&state, &headers)?;
    let projection = state.projection(&name)?;
    let key = query.key;
    let partitions: Vec<SourcePartition> = parse_positions(&query.partitions, false)?.into_keys().collect();
    let min = parse_positions(query.min_as_of.as_deref().unwrap_or_default(), true)?;
    let live = projection.live();
    // Within the asking worker's timeout, with room for the answer to travel.
    let wait = cluster.forward_timeout / 2;
    Ok(Json(
        local_partials(&state, &cluster, &live, &key, &partitions, &min, wait).await?,
    ))
}

/// The cluster of a request from another worker, which must carry the secret.
fn between_workers(state: &ApiState, headers: &HeaderMap) -> Result<Arc<Cluster>, ApiError> {
    let Some(cluster) = state.cluster.clone() else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            "this worker is not in a cluster".into(),
        ));
    };
    let offered = headers
        .get(SECRET_HEADER)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if super::access::constant_time_eq(offered, cluster.secret().as_bytes()) {
        Ok(cluster)
    } else {
        Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong cluster secret".into(),
        ))
    }
}

/// The cluster as this worker sees it, for `GET /projections`.
pub(super) fn view(cluster: &Cluster) -> Value {
    let mut workers: Vec<Value> = cluster
        .workers()
        .into_iter()
        .map(|(record, age)| {
            json!({
                "worker_id": record.worker_id,
                "url": record.url,
                "heard_ms_ago": u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
                "projections": record.projections,
            })
        })
        .collect();
    workers.sort_by(|a, b| a["worker_id"].as_str().cmp(&b["worker_id"].as_str()));
    json!({
        "worker_id": cluster.worker_id,
        "topic": cluster.topic,
        "partitioner": cluster.partitioner,
        "workers": workers,
    })
}
