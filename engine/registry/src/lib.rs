//! A small schema registry serving the Confluent REST API that clients use, for
//! development, the demo and tests (`projector registry`).
//!
//! Served: `POST /subjects/{subject}/versions`, `GET /subjects`,
//! `GET /subjects/{subject}/versions[/{version|latest}]`,
//! `GET /subjects/{subject}/versions/{version}/referencedby`, `GET /schemas/ids/{id}`,
//! `POST /subjects/{subject}` (lookup), `GET|PUT /config[/{subject}]`. Schemas may
//! carry Confluent schema references (`references: [{name, subject, version}]`).
//! Errors are Confluent's JSON: `{"error_code": ..., "message": ...}`.

mod subjects;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};

pub use subjects::{Compatibility, Reference, RegistryFault, SubjectVersion, Subjects};

type Shared = Arc<Mutex<Subjects>>;

/// The registry's routes, over `subjects`.
pub fn router(subjects: Subjects) -> Router {
    let shared: Shared = Arc::new(Mutex::new(subjects));
    Router::new()
        .route("/subjects", get(list_subjects))
        .route("/subjects/{subject}", axum::routing::post(lookup))
        .route("/subjects/{subject}/versions", get(list_versions).post(register))
        .route("/subjects/{subject}/versions/{version}", get(get_version))
        .route(
            "/subjects/{subject}/versions/{version}/referencedby",
            get(referenced_by),
        )
        .route("/schemas/ids/{id}", get(get_schema))
        .route("/config", get(get_global_config).put(put_global_config))
        .route(
            "/config/{subject}",
            get(get_subject_config).put(put_subject_config),
        )
        .with_state(shared)
}

/// Opens the registry's data: in memory, or persisted in `data_dir/registry.json`.
pub fn open(data_dir: Option<PathBuf>) -> Result<Subjects, String> {
    let file = match data_dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            Some(dir.join("registry.json"))
        }
        None => None,
    };
    Subjects::open(file)
}

/// Confluent's content type.
const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

fn reply(status: StatusCode, body: Value) -> Response {
    (status, [(header::CONTENT_TYPE, CONTENT_TYPE)], body.to_string()).into_response()
}

impl IntoResponse for RegistryFault {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        reply(
            status,
            json!({ "error_code": self.code, "message": self.message }),
        )
    }
}

type Answer = Result<Response, RegistryFault>;

fn ok(body: Value) -> Answer {
    Ok(reply(StatusCode::OK, body))
}

fn version_json(version: &SubjectVersion) -> Value {
    let mut body = json!({
        "subject": version.subject,
        "version": version.version,
        "id": version.id,
        "schema": version.schema,
    });
    with_references(&mut body, &version.references);
    body
}

/// Adds `references` to an answer when there are any, as Confluent does.
fn with_references(body: &mut Value, references: &[Reference]) {
    if !references.is_empty() {
        body["references"] = json!(references);
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SchemaBody {
    schema: String,
    #[serde(default)]
    schema_type: Option<String>,
    #[serde(default)]
    references: Vec<Reference>,
}

fn schema_body(body: &[u8]) -> Result<SchemaBody, RegistryFault> {
    let parsed: SchemaBody = serde_json::from_slice(body).map_err(RegistryFault::bad_request)?;
    if let Some(kind) = parsed.schema_type.as_deref() {
        if kind != "AVRO" {
            return Err(RegistryFault::invalid_schema(format!(
                "schemaType {kind} is not supported, only AVRO"
            )));
        }
    }
    Ok(parsed)
}

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Subjects> {
    shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn list_subjects(State(shared): State<Shared>) -> Answer {
    ok(json!(lock(&shared).subjects()))
}

async fn list_versions(State(shared): State<Shared>, Path(subject): Path<String>) -> Answer {
    ok(json!(lock(&shared).versions(&subject)?))
}

async fn get_version(
    State(shared): State<Shared>,
    Path((subject, version)): Path<(String, String)>,
) -> Answer {
    ok(version_json(&lock(&shared).version(&subject, &version)?))
}

async fn referenced_by(
    State(shared): State<Shared>,
    Path((subject, version)): Path<(String, String)>,
) -> Answer {
    ok(json!(lock(&shared).referenced_by(&subject, &version)?))
}

async fn get_schema(State(shared): State<Shared>, Path(id): Path<String>) -> Answer {
    let id: u32 = id.parse().map_err(|_| RegistryFault::schema_not_found(&id))?;
    let subjects = lock(&shared);
    let mut body = json!({ "schema": subjects.schema(id)? });
    with_references(&mut body, subjects.references(id));
    ok(body)
}

async fn register(State(shared): State<Shared>, Path(subject): Path<String>, body: Bytes) -> Answer {
    let body = schema_body(&body)?;
    let id = lock(&shared).register(&subject, &body.schema, &body.references)?;
    ok(json!({ "id": id }))
}

async fn lookup(State(shared): State<Shared>, Path(subject): Path<String>, body: Bytes) -> Answer {
    let body = schema_body(&body)?;
    ok(version_json(&lock(&shared).lookup(
        &subject,
        &body.schema,
        &body.references,
    )?))
}

#[derive(Deserialize)]
struct ConfigBody {
    compatibility: String,
}

fn level(body: &[u8]) -> Result<Compatibility, RegistryFault> {
    let body: ConfigBody = serde_json::from_slice(body).map_err(RegistryFault::bad_request)?;
    serde_json::from_value(Value::String(body.compatibility.clone()))
        .map_err(|_| RegistryFault::invalid_compatibility(&body.compatibility))
}

async fn get_global_config(State(shared): State<Shared>) -> Answer {
    ok(json!({ "compatibilityLevel": lock(&shared).global_compatibility() }))
}

async fn put_global_config(State(shared): State<Shared>, body: Bytes) -> Answer {
    let level = level(&body)?;
    lock(&shared).set_compatibility(None, level)?;
    ok(json!({ "compatibility": level }))
}

async fn get_subject_config(State(shared): State<Shared>, Path(subject): Path<String>) -> Answer {
    let subjects = lock(&shared);
    match subjects.subject_compatibility(&subject) {
        Some(level) => ok(json!({ "compatibilityLevel": level })),
        None => Err(RegistryFault {
            status: 404,
            code: 40408,
            message: format!("Subject '{subject}' does not have subject-level compatibility configured"),
        }),
    }
}

async fn put_subject_config(
    State(shared): State<Shared>,
    Path(subject): Path<String>,
    body: Bytes,
) -> Answer {
    let level = level(&body)?;
    lock(&shared).set_compatibility(Some(&subject), level)?;
    ok(json!({ "compatibility": level }))
}
