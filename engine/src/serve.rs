//! The HTTP API: projections, their state, health and metrics.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::request::Parts;
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::metrics;
use crate::store::{SourcePartition, Store};

mod access;
mod as_of;
mod checkpoint;
mod cluster;
mod read;
mod scan;
use crate::supervisor::{StartError, Supervisor};

/// What the handlers read.
#[derive(Clone)]
pub struct ApiState {
    /// Projections by name.
    pub projections: Arc<BTreeMap<String, Arc<Supervisor>>>,
    /// The worker's database.
    pub store: Arc<Store>,
    /// Bearer token of the admin endpoints; `None` disables them.
    pub admin_token: Option<String>,
    /// Bearer tokens of the read routes; empty: reads are open.
    pub read_tokens: Arc<Vec<String>>,
    /// Whether `/healthz`, `/readyz` and `/metrics` need a read token too.
    pub protect_probes: bool,
    /// Permits for key scans running at once.
    pub scans: Arc<tokio::sync::Semaphore>,
    /// Kafka, for the high watermarks of a new as-of generation (`None`: they
    /// are refused).
    pub kafka: Option<crate::config::KafkaConfig>,
    /// Multi-worker mode: reads are routed to the owners of the partitions.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

/// The API's routes.
pub fn router(state: ApiState) -> Router {
    let read_guard = axum::middleware::from_fn_with_state(state.clone(), access::require_read_token);
    let reads = Router::new()
        .route("/projections", get(list_projections))
        .route("/projections/{name}", get(show_projection))
        .route("/projections/{name}/state", get(scan::scan_keys))
        .route("/projections/{name}/state/{*key}", get(read::read_key))
        .route_layer(read_guard.clone());
    let probes = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readiness))
        .route("/metrics", get(|| async { metrics::render() }));
    let probes = if state.protect_probes {
        probes.route_layer(read_guard)
    } else {
        probes
    };
    // Admin routes check the admin token themselves (before reading the body).
    let admin = Router::new()
        .route("/projections/{name}/resume", post(resume))
        .route("/projections/{name}/skip", post(skip))
        .route(
            "/projections/{name}/replay",
            post(start_replay).delete(abort_replay),
        )
        .route("/projections/{name}/as-of", post(as_of::request))
        .route(
            "/projections/{name}/as-of/{until}",
            axum::routing::delete(as_of::remove),
        )
        .route("/checkpoint", post(checkpoint::take));
    // Requests between workers carry the cluster secret instead of a token.
    let between_workers = Router::new()
        .route("/cluster/projections/{name}/partials", get(cluster::partials))
        .route("/cluster/projections/{name}/scan", get(cluster::scan_parts));
    reads
        .merge(probes)
        .merge(admin)
        .merge(between_workers)
        .with_state(state)
}

/// A JSON error response: `{"error": "..."}` with a status.
#[derive(Debug)]
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

/// `Path`, with its rejections (a parameter that is not UTF-8 once
/// percent-decoded) answered as [`ApiError`]s.
struct ApiPath<T>(T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(ApiPath(value)),
            Err(rejection) => Err(ApiError(rejection.status(), rejection.body_text())),
        }
    }
}

/// `Query`, with its rejections (`limit=abc`) answered as [`ApiError`]s.
struct ApiQuery<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(ApiQuery(value)),
            Err(rejection) => Err(ApiError(rejection.status(), rejection.body_text())),
        }
    }
}

impl ApiState {
    /// Refuses `what` in multi-worker mode, where it would run on this worker's
    /// partitions alone (or all of them, in a group of its own) and reads would
    /// mix its generation with the other workers'.
    fn alone(&self, what: &str) -> Result<(), ApiError> {
        match &self.cluster {
            None => Ok(()),
            Some(_) => Err(ApiError(
                StatusCode::CONFLICT,
                format!(
                    "{what} are not available in multi-worker mode yet: they would run on one \
                     worker and leave the others on the old generation; run them on a worker \
                     alone (without [cluster]) until they are built across workers"
                ),
            )),
        }
    }

    fn projection(&self, name: &str) -> Result<&Arc<Supervisor>, ApiError> {
        self.projections
            .get(name)
            .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no projection named `{name}`")))
    }

    fn describe(&self, projection: &Supervisor) -> Result<Value, ApiError> {
        let live = projection.live();
        // A damaged offset row must not hide every projection's status: it is
        // shown beside the others (the fold loop stops on it, naming it).
        let (offsets, store_error) = match self.store.offsets(&live.generation) {
            Ok(offsets) => (
                offsets
                    .into_iter()
                    .map(|(partition, next)| (partition.to_string(), next))
                    .collect::<BTreeMap<String, i64>>(),
                None,
            ),
            Err(error) => (BTreeMap::new(), Some(error.to_string())),
        };
        let definition = self.store.definition(&live.generation).map_err(internal)?;
        let mut description = json!({
            "name": projection.name,
            "kind": projection.kind,
            "topics": live.topics,
            "generation": live.generation.number,
            "status": live.state(),
            "shared_source": live.is_shared(),
            "offsets": offsets,
            "definition_matches_config": definition.as_ref() == Some(&projection.configured_definition),
            "lag": {
                "events": crate::lag::summary(&projection.name).0,
                "seconds": crate::lag::summary(&projection.name).1,
            },
            "replay": projection.replay_status(),
            "last_replay": projection.last_replay(),
            "as_of_generations": as_of::describe_all(&self.store, projection),
        });
        if let Some(cluster) = &self.cluster {
            (description["replay"], description["last_replay"]) =
                cluster::replay::describe(cluster, projection);
        }
        if let Some(error) = store_error {
            description["store_error"] = json!(error);
        }
        Ok(description)
    }
}

/// 200 when every projection runs with its partitions assigned and positioned at
/// their stored offsets; 503 with the reasons otherwise.
async fn readiness(State(state): State<ApiState>) -> (StatusCode, Json<Value>) {
    let mut waiting: Vec<String> = state.projections.values().filter_map(|p| p.not_ready()).collect();
    if let Some(silent) = crate::lag::brokers_silent_for() {
        waiting.push(format!(
            "kafka: the brokers have not answered for {:.0} s",
            silent.as_secs_f64()
        ));
    }
    if waiting.is_empty() {
        (StatusCode::OK, Json(json!({ "ready": true })))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false, "reasons": waiting })),
        )
    }
}

fn internal(error: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string())
}

async fn list_projections(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    cluster::replay::view_read(state.cluster.as_ref()).await;
    let list = state
        .projections
        .values()
        .map(|projection| state.describe(projection))
        .collect::<Result<Vec<_>, _>>()?;
    let mut answer = json!({ "projections": list });
    if let Some(cluster) = &state.cluster {
        answer["cluster"] = cluster::view(cluster);
    }
    Ok(Json(answer))
}

async fn show_projection(
    State(state): State<ApiState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let projection = state.projection(&name)?;
    cluster::replay::view_read(state.cluster.as_ref()).await;
    Ok(Json(state.describe(projection)?))
}

/// `as_of`: the next offset of each source partition that the answer reflects.
fn as_of_offsets(offsets: BTreeMap<crate::store::SourcePartition, i64>) -> Value {
    Value::Object(
        offsets
            .into_iter()
            .map(|(p, next)| (p.to_string(), json!(next)))
            .collect(),
    )
}

/// The value of `key` merged from its stored partial states; 404 when it has
/// none, or when the projection's merge says there is no value.
fn merged_value(
    live: &crate::fold_state::Fold,
    name: &str,
    key: &str,
    partials: &[Vec<u8>],
) -> Result<Value, ApiError> {
    let not_found = || {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("projection `{name}` has no state for key `{key}`"),
        )
    };
    if partials.is_empty() {
        return Err(not_found());
    }
    live.projection
        .merge_stored(key, partials)
        .map_err(|e| internal(format!("merging the partial states of `{key}`: {e}")))?
        .ok_or_else(not_found)
}

/// `topic/partition:offset,...` (as `min_as_of`: `with_offsets`) or
/// `topic/partition,...` (as the partitions a forwarded read asks for, with
/// offset 0).
fn parse_positions(text: &str, with_offsets: bool) -> Result<BTreeMap<SourcePartition, i64>, ApiError> {
    let bad = |item: &str| {
        let form = if with_offsets {
            "topic/partition:offset"
        } else {
            "topic/partition"
        };
        ApiError(StatusCode::BAD_REQUEST, format!("`{item}` is not `{form}`"))
    };
    let mut positions = BTreeMap::new();
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (partition, offset) = match (item.rsplit_once(':'), with_offsets) {
            (Some((partition, offset)), true) => (partition, offset.parse::<i64>().map_err(|_| bad(item))?),
            (None, false) => (item, 0),
            _ => return Err(bad(item)),
        };
        let (topic, number) = partition.rsplit_once('/').ok_or_else(|| bad(item))?;
        let number = number.parse::<i32>().map_err(|_| bad(item))?;
        if topic.is_empty() || number < 0 || offset < 0 {
            return Err(bad(item));
        }
        positions.insert(
            SourcePartition {
                topic: topic.into(),
                partition: number,
            },
            offset,
        );
    }
    Ok(positions)
}

/// Most bytes read of an admin request's body; they take no options.
const MAX_ADMIN_BODY_BYTES: usize = 4096;

/// Admin requests take no options: the body must be empty, or `{}` as
/// `application/json`. Anything else is refused, so a client that means an option
/// the endpoint does not have is told so instead of being obeyed without it.
async fn expect_no_options(headers: &HeaderMap, body: Body) -> Result<(), ApiError> {
    let refuse = |status, why: String| {
        Err(ApiError(
            status,
            format!("{why}; admin requests take no body, or `{{}}` as application/json"),
        ))
    };
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_ADMIN_BODY_BYTES as u64) {
        return refuse(StatusCode::PAYLOAD_TOO_LARGE, "the body is too large".into());
    }
    let Ok(bytes) = axum::body::to_bytes(body, MAX_ADMIN_BODY_BYTES).await else {
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body could not be read within {MAX_ADMIN_BODY_BYTES} bytes"),
        );
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    let content_type = headers
        .get(CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    let media_type = content_type.split(';').next().unwrap_or_default().trim();
    if !media_type.eq_ignore_ascii_case("application/json") {
        return refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("a body of content type `{content_type}`"),
        );
    }
    match serde_json::from_slice::<Value>(&bytes) {
        Err(e) => refuse(StatusCode::BAD_REQUEST, format!("the body is not JSON: {e}")),
        Ok(Value::Object(options)) if options.is_empty() => Ok(()),
        Ok(Value::Object(options)) => refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "unknown options {}",
                options
                    .keys()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        Ok(_) => refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the body is JSON but not an object".into(),
        ),
    }
}

async fn resume(
    State(state): State<ApiState>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    state.authorize(&headers)?;
    expect_no_options(&headers, body).await?;
    let projection = state.projection(&name)?;
    let Some(generation) = projection.resume() else {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!(
                "projection `{name}` is not stopped: {}",
                json!(projection.live().state())
            ),
        ));
    };
    tracing::warn!(projection = %name, generation, "operator resumed the projection");
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "resumed": name, "generation": generation })),
    ))
}

async fn skip(
    State(state): State<ApiState>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    state.authorize(&headers)?;
    expect_no_options(&headers, body).await?;
    let projection = state.projection(&name)?;
    let Some((generation, position)) = projection.skip_poison() else {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!(
                "projection `{name}` is not stopped on a poison event: {}",
                json!(projection.live().state())
            ),
        ));
    };
    tracing::warn!(projection = %name, generation, topic = %position.topic, partition = position.partition,
        offset = position.offset, "operator asked to skip the poison event");
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "skipping": position, "generation": generation })),
    ))
}

/// Starts a replay into a new generation; 409 with the running one's status when
/// one runs.
async fn start_replay(
    State(state): State<ApiState>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    state.authorize(&headers)?;
    expect_no_options(&headers, body).await?;
    let projection = state.projection(&name)?.clone();
    if let Some(cluster) = &state.cluster {
        return cluster::replay::start(cluster, &projection).await;
    }
    let store = state.store.clone();
    let started = tokio::task::spawn_blocking(move || {
        projection
            .start_replay(&store)
            .map(|replay| (replay, projection.replay_status()))
    })
    .await
    .map_err(internal)?;
    match started {
        Ok((replay, status)) => {
            tracing::warn!(projection = %name, generation = replay.fold.generation.number,
                "operator started a replay");
            Ok((StatusCode::ACCEPTED, Json(json!({ "replay": status }))).into_response())
        }
        Err(StartError::Running(status)) => Ok((
            StatusCode::CONFLICT,
            Json(json!({
                "error": format!("a replay of `{name}` is running already"),
                "replay": status,
            })),
        )
            .into_response()),
        Err(StartError::Store(e)) => Err(internal(e)),
    }
}

/// Aborts the running replay and drops its generation; the live one is untouched.
async fn abort_replay(
    State(state): State<ApiState>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    state.authorize(&headers)?;
    expect_no_options(&headers, body).await?;
    let projection = state.projection(&name)?.clone();
    if let Some(cluster) = &state.cluster {
        return cluster::replay::abort(cluster, &projection).await;
    }
    let store = state.store.clone();
    let aborted = tokio::task::spawn_blocking(move || projection.abort_replay(&store))
        .await
        .map_err(internal)?;
    match aborted {
        Some(generation) => {
            tracing::warn!(projection = %name, generation, "operator aborted the replay");
            Ok((StatusCode::ACCEPTED, Json(json!({ "aborting": generation }))))
        }
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no replay of `{name}` is running"),
        )),
    }
}

#[cfg(test)]
mod tests;
