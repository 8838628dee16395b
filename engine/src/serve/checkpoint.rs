//! `POST /checkpoint` (admin): a checkpoint of the running worker's store, written
//! on the worker's machine (see [`crate::store::Store::checkpoint`]).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde_json::{json, Value};

use super::{internal, ApiError, ApiState};
use crate::store::CheckpointError;

/// The body: `{"to": "/absolute/dir"}`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointRequest {
    to: std::path::PathBuf,
}

pub(super) async fn take(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    state.authorize(&headers)?;
    let request: CheckpointRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("the body must be {{\"to\": \"<absolute directory>\"}}: {e}"),
        )
    })?;
    if !request.to.is_absolute() {
        return Err(ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("`to` must be an absolute directory, got {}", request.to.display()),
        ));
    }
    let store = state.store.clone();
    let to = request.to.clone();
    let taken = tokio::task::spawn_blocking(move || store.checkpoint(&to))
        .await
        .map_err(internal)?;
    match taken {
        Ok(manifest) => {
            tracing::warn!(to = %request.to.display(), "operator took a checkpoint");
            Ok((StatusCode::CREATED, Json(json!({ "checkpoint": manifest }))))
        }
        Err(e @ CheckpointError::NotEmpty(_)) => Err(ApiError(StatusCode::CONFLICT, e.to_string())),
        Err(e) => Err(internal(e)),
    }
}
