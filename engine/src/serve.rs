//! The HTTP API: projections, their state, health and metrics.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::metrics;
use crate::runtime::ProjectionRuntime;
use crate::store::Store;

/// What the handlers read.
#[derive(Clone)]
pub struct ApiState {
    /// Projections by name.
    pub projections: Arc<BTreeMap<String, Arc<ProjectionRuntime>>>,
    /// The worker's database.
    pub store: Arc<Store>,
}

/// The API's routes.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/projections", get(list_projections))
        .route("/projections/{name}", get(show_projection))
        .route("/projections/{name}/state/{*key}", get(read_key))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(|| async { metrics::render() }))
        .with_state(state)
}

/// A JSON error response: `{"error": "..."}` with a status.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl ApiState {
    fn projection(&self, name: &str) -> Result<&Arc<ProjectionRuntime>, ApiError> {
        self.projections.get(name).ok_or_else(|| {
            ApiError(
                StatusCode::NOT_FOUND,
                format!("no projection named `{name}`"),
            )
        })
    }

    fn describe(&self, projection: &ProjectionRuntime) -> Result<Value, ApiError> {
        let generation = projection.generation();
        let offsets: BTreeMap<String, i64> = self
            .store
            .offsets(&generation)
            .map_err(internal)?
            .into_iter()
            .map(|(partition, next)| (partition.to_string(), next))
            .collect();
        Ok(json!({
            "name": projection.name,
            "kind": projection.kind,
            "topics": projection.topics,
            "generation": generation.number,
            "status": projection.state(),
            "offsets": offsets,
        }))
    }
}

fn internal(error: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, error.to_string())
}

async fn list_projections(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let list = state
        .projections
        .values()
        .map(|projection| state.describe(projection))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(json!({ "projections": list })))
}

async fn show_projection(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let projection = state.projection(&name)?;
    Ok(Json(state.describe(projection)?))
}

async fn read_key(
    State(state): State<ApiState>,
    Path((name, key)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let projection = state.projection(&name)?;
    let partials = state
        .store
        .partials(&projection.generation(), &key)
        .map_err(internal)?;
    if partials.is_empty() {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("projection `{name}` has no state for key `{key}`"),
        ));
    }
    Ok(Json(projection.projection.merge(partials)))
}
