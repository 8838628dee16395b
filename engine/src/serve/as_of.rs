//! As-of generations over HTTP: `POST /projections/{name}/as-of` (admin) with
//! `{"until": "<RFC 3339>"}` starts one, `DELETE /projections/{name}/as-of/{until}`
//! (admin) removes one, `?at=<until>` on reads answers from one, and
//! `/projections` lists them with their progress.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header::RETRY_AFTER, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::{internal, ApiError, ApiPath, ApiState};
use crate::as_of::{format_instant, parse_instant, targets_now};
use crate::fold_state::Fold;
use crate::store::Store;
use crate::supervisor::{AsOfError, Supervisor};

/// A refusal with a JSON body of its own (and `Retry-After` when given).
pub(super) struct Refusal {
    status: StatusCode,
    body: Value,
    retry_after: Option<u64>,
}

impl Refusal {
    /// 503 with `body` and `Retry-After: 1`: what is asked for will be served soon.
    pub(super) fn unavailable(body: Value) -> Self {
        Refusal {
            status: StatusCode::SERVICE_UNAVAILABLE,
            body,
            retry_after: Some(1),
        }
    }
}

impl From<ApiError> for Refusal {
    fn from(ApiError(status, error): ApiError) -> Self {
        Refusal {
            status,
            body: json!({ "error": error }),
            retry_after: None,
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(RETRY_AFTER, axum::http::HeaderValue::from(seconds));
        }
        response
    }
}

/// The body of a request: `{"until": "2026-06-30T23:59:59.000Z"}`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AsOfRequest {
    until: String,
}

fn parse_until(text: &str) -> Result<i64, ApiError> {
    parse_instant(text).ok_or_else(|| {
        ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("`{text}` is not an RFC 3339 time such as 2026-06-30T23:59:59.000Z"),
        )
    })
}

/// What `/projections` shows of one as-of generation.
pub(super) fn describe(store: &Store, fold: &Fold) -> Value {
    let Some(spec) = &fold.as_of else {
        return Value::Null;
    };
    let progress = match store.offsets(&fold.generation) {
        Ok(offsets) => spec.progress(&offsets),
        Err(e) => json!({ "error": e.to_string() }),
    };
    json!({
        "until": spec.until_text(),
        "generation": fold.generation.number,
        "complete": spec.is_complete(),
        "status": fold.state(),
        "requested_at": spec.requested_at,
        "progress": progress,
    })
}

/// The as-of generations of `projection`, as `/projections` lists them.
pub(super) fn describe_all(store: &Store, projection: &Supervisor) -> Value {
    Value::Array(
        projection
            .as_of_folds()
            .iter()
            .map(|fold| describe(store, fold))
            .collect(),
    )
}

/// The generation a read with `at` answers from: the live one without `at`, else
/// the complete as-of generation of that time (404 listing the ones there are;
/// 503 while it is still folding). With the `until` it answers for.
pub(super) fn resolve(
    store: &Store,
    name: &str,
    projection: &Supervisor,
    at: Option<&str>,
) -> Result<(Arc<Fold>, Option<String>), Refusal> {
    let Some(at) = at else {
        return Ok((projection.live(), None));
    };
    let until_ms = parse_until(at)?;
    let Some(fold) = projection.as_of_at(until_ms) else {
        let available: Vec<String> = projection
            .as_of_folds()
            .iter()
            .filter_map(|f| f.as_of.as_ref().map(|s| s.until_text()))
            .collect();
        return Err(Refusal {
            status: StatusCode::NOT_FOUND,
            body: json!({
                "error": format!("projection `{name}` has no as-of generation until {}", format_instant(until_ms)),
                "available": available,
            }),
            retry_after: None,
        });
    };
    let until = format_instant(until_ms);
    if !fold.as_of.as_ref().is_some_and(|spec| spec.is_complete()) {
        return Err(Refusal {
            status: StatusCode::SERVICE_UNAVAILABLE,
            body: json!({
                "error": format!("the as-of generation until {until} of `{name}` is still folding"),
                "as_of_generation": describe(store, &fold),
            }),
            retry_after: Some(1),
        });
    }
    Ok((fold, Some(until)))
}

/// `POST /projections/{name}/as-of`: starts an as-of generation (202), 409 when
/// one of that time exists.
pub(super) async fn request(
    State(state): State<ApiState>,
    ApiPath(name): ApiPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    state.authorize(&headers)?;
    state.alone("as-of generations")?;
    let request: AsOfRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("the body must be {{\"until\": \"<RFC 3339 time>\"}}: {e}"),
        )
    })?;
    let until_ms = parse_until(&request.until)?;
    let projection = state.projection(&name)?.clone();
    let Some(kafka) = state.kafka.clone() else {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "this server has no Kafka connection to read high watermarks from".into(),
        ));
    };
    let store = state.store.clone();
    let started = tokio::task::spawn_blocking(move || {
        let topics = crate::config::definition_topics(&projection.configured_definition);
        let targets = targets_now(&kafka, &topics).map_err(|e| {
            ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("reading the high watermarks: {e}"),
            )
        })?;
        match projection.request_as_of(&store, until_ms, targets) {
            Ok(fold) => Ok(describe(&store, &fold)),
            Err(e @ AsOfError::Exists(_)) => Err(ApiError(StatusCode::CONFLICT, e.to_string())),
            Err(AsOfError::Store(e)) => Err(internal(e)),
        }
    })
    .await
    .map_err(internal)??;
    tracing::warn!(projection = %name, until = %format_instant(until_ms), "operator requested an as-of generation");
    Ok((StatusCode::ACCEPTED, Json(json!({ "as_of_generation": started }))))
}

/// `DELETE /projections/{name}/as-of/{until}`: drops one (404 when there is none).
pub(super) async fn remove(
    State(state): State<ApiState>,
    ApiPath((name, until)): ApiPath<(String, String)>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    state.authorize(&headers)?;
    let until_ms = parse_until(&until)?;
    let projection = state.projection(&name)?.clone();
    let store = state.store.clone();
    let removed = tokio::task::spawn_blocking(move || projection.remove_as_of(&store, until_ms))
        .await
        .map_err(internal)?
        .map_err(internal)?;
    if !removed {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!(
                "projection `{name}` has no as-of generation until {}",
                format_instant(until_ms)
            ),
        ));
    }
    tracing::warn!(projection = %name, until = %format_instant(until_ms), "operator removed an as-of generation");
    Ok((
        StatusCode::OK,
        Json(json!({ "removed": format_instant(until_ms) })),
    ))
}
