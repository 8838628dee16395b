//! Writer schemas by id, from a Confluent-compatible schema registry, cached.
//!
//! A schema id never changes meaning, so a fetched schema is cached for the life of
//! the process. What an answer means is decided by its HTTP status and, for a 404,
//! Confluent's error code: only `40403` (schema not found) says the id does not
//! exist, which makes the event poison. Anything else (a registry that is down,
//! overloaded, misconfigured behind a proxy, or refusing our credentials) is not
//! the event's fault: it is waited out with capped exponential backoff, loudly.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backoff::Backoff;
use crate::config::RegistryConfig;
use crate::metrics;

/// Confluent's error code for "schema not found" (with HTTP 404).
const SCHEMA_NOT_FOUND: i64 = 40403;

/// What a registry lookup can end in, besides a schema.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    /// The registry answered that the id does not exist.
    #[error("schema id {0} is not known to the registry")]
    UnknownId(u32),
    /// The registry returned something that is not a usable Avro schema.
    #[error("schema id {id} is not a usable Avro schema: {message}")]
    BadSchema {
        /// The schema id.
        id: u32,
        /// What is wrong with it.
        message: String,
    },
    /// The caller asked to stop while the registry was unreachable.
    #[error("stopped while waiting for the schema registry: {0}")]
    Interrupted(String),
    /// The client could not be built (bad URL or TLS setup).
    #[error("schema registry client: {0}")]
    Client(String),
}

/// One answer of the registry, classified.
#[derive(Debug)]
enum Answer {
    /// The schema's text.
    Schema(String),
    /// 404 with error code 40403.
    NotFound,
    /// 200 with something that is not an Avro schema.
    NotAvro(String),
    /// Anything to wait out, with what happened.
    Unavailable(String),
}

/// The body of `GET /schemas/ids/{id}`.
#[derive(serde::Deserialize)]
struct SchemaById {
    schema: String,
    #[serde(default, rename = "schemaType")]
    schema_type: Option<String>,
}

/// The body of a Confluent error answer.
#[derive(serde::Deserialize)]
struct ErrorBody {
    error_code: i64,
    #[serde(default)]
    message: String,
}

/// Cached registry client.
pub struct RegistryClient {
    http: reqwest::Client,
    base_url: String,
    credentials: Option<(String, Option<String>)>,
    max_backoff: Duration,
    cache: Mutex<HashMap<u32, Arc<apache_avro::Schema>>>,
    runtime: tokio::runtime::Handle,
}

impl RegistryClient {
    /// A client for `config`; requests run on `runtime`.
    pub fn new(config: &RegistryConfig, runtime: tokio::runtime::Handle) -> Result<Self, RegistryError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .build()
            .map_err(|e| RegistryError::Client(e.to_string()))?;
        let base_url = config.url.trim_end_matches('/').to_owned();
        reqwest::Url::parse(&base_url).map_err(|e| RegistryError::Client(format!("registry.url: {e}")))?;
        Ok(RegistryClient {
            http,
            base_url,
            credentials: config
                .username
                .clone()
                .map(|user| (user, config.password.clone())),
            max_backoff: Duration::from_millis(config.max_backoff_ms.max(1)),
            cache: Mutex::new(HashMap::new()),
            runtime,
        })
    }

    /// The writer schema with `id`. Blocks (retrying) while the registry is
    /// unavailable, until it answers or `keep_waiting` returns false. Call it from
    /// a thread that is not a tokio worker.
    pub fn schema(
        &self,
        id: u32,
        keep_waiting: &dyn Fn() -> bool,
    ) -> Result<Arc<apache_avro::Schema>, RegistryError> {
        if let Some(schema) = self.cache.lock().expect("registry cache lock").get(&id) {
            return Ok(schema.clone());
        }
        let mut backoff = Backoff::new(Duration::from_millis(100), self.max_backoff);
        loop {
            match self.runtime.block_on(self.fetch(id)) {
                Answer::Schema(text) => {
                    metrics::registry_request("ok");
                    let schema =
                        apache_avro::Schema::parse_str(&text).map_err(|e| RegistryError::BadSchema {
                            id,
                            message: e.to_string(),
                        })?;
                    let schema = Arc::new(schema);
                    self.cache
                        .lock()
                        .expect("registry cache lock")
                        .insert(id, schema.clone());
                    return Ok(schema);
                }
                Answer::NotAvro(message) => {
                    metrics::registry_request("ok");
                    return Err(RegistryError::BadSchema { id, message });
                }
                Answer::NotFound => {
                    metrics::registry_request("not_found");
                    return Err(RegistryError::UnknownId(id));
                }
                Answer::Unavailable(why) => {
                    metrics::registry_request("error");
                    if !keep_waiting() {
                        return Err(RegistryError::Interrupted(why));
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(
                        schema_id = id,
                        retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                        error = %why,
                        "schema registry unavailable; retrying"
                    );
                    std::thread::sleep(delay);
                }
            }
        }
    }

    async fn fetch(&self, id: u32) -> Answer {
        let url = format!("{}/schemas/ids/{id}", self.base_url);
        let mut request = self
            .http
            .get(&url)
            .header("Accept", "application/vnd.schemaregistry.v1+json");
        if let Some((user, password)) = &self.credentials {
            request = request.basic_auth(user, password.as_deref());
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) => return Answer::Unavailable(format!("GET {url}: {e}")),
        };
        let status = response.status();
        let body = match response.bytes().await {
            Ok(body) => body,
            Err(e) => return Answer::Unavailable(format!("GET {url}: {status}, reading the body: {e}")),
        };
        classify(&url, status.as_u16(), &body)
    }
}

/// What an answer with `status` and `body` means.
fn classify(url: &str, status: u16, body: &[u8]) -> Answer {
    match status {
        200 => match serde_json::from_slice::<SchemaById>(body) {
            Ok(found) => match found.schema_type.as_deref() {
                None | Some("AVRO") => Answer::Schema(found.schema),
                Some(other) => Answer::NotAvro(format!("it is a {other} schema")),
            },
            Err(e) => Answer::Unavailable(format!("GET {url}: 200 with an unreadable body: {e}")),
        },
        404 => match serde_json::from_slice::<ErrorBody>(body) {
            Ok(error) if error.error_code == SCHEMA_NOT_FOUND => Answer::NotFound,
            // A 404 without the registry's code is a wrong URL or a proxy, not a
            // missing schema: the events are fine.
            Ok(error) => Answer::Unavailable(format!(
                "GET {url}: 404 with error code {} ({}); is registry.url right?",
                error.error_code, error.message
            )),
            Err(_) => Answer::Unavailable(format!("GET {url}: 404 without a registry error; is registry.url right?")),
        },
        401 | 403 => Answer::Unavailable(format!(
            "GET {url}: {status}: the registry refuses these credentials (registry.username, registry.password)"
        )),
        _ => Answer::Unavailable(format!(
            "GET {url}: {status} {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str) -> Answer {
        classify("http://r/schemas/ids/7", status, body.as_bytes())
    }

    #[test]
    fn only_a_404_with_code_40403_means_the_id_does_not_exist() {
        assert!(matches!(
            answer(404, r#"{"error_code":40403,"message":"Schema not found"}"#),
            Answer::NotFound
        ));
        for (status, body) in [
            (404, r#"{"error_code":404,"message":"HTTP 404 Not Found"}"#),
            (404, "<html>not here</html>"),
            (401, r#"{"error_code":401,"message":"Unauthorized"}"#),
            (403, ""),
            (
                500,
                r#"{"error_code":50001,"message":"Error in the backend data store"}"#,
            ),
            (503, ""),
            (429, ""),
            (200, "not json"),
        ] {
            assert!(
                matches!(answer(status, body), Answer::Unavailable(_)),
                "{status} {body} is waited out"
            );
        }
    }

    #[test]
    fn a_schema_answer_is_avro_or_refused() {
        assert!(matches!(
            answer(200, r#"{"schema":"\"string\""}"#),
            Answer::Schema(s) if s == "\"string\""
        ));
        assert!(matches!(
            answer(200, r#"{"schema":"\"string\"","schemaType":"AVRO"}"#),
            Answer::Schema(_)
        ));
        assert!(matches!(
            answer(
                200,
                r#"{"schema":"syntax = \"proto3\";","schemaType":"PROTOBUF"}"#
            ),
            Answer::NotAvro(_)
        ));
    }
}
