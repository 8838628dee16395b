//! Writer schemas by id, from a Confluent-compatible schema registry, cached.
//!
//! A schema id never changes meaning, so a fetched schema is cached for the life of
//! the process. What an answer means is decided by its HTTP status and, for a 404,
//! Confluent's error code: only `40403` (schema not found) says the id does not
//! exist, which makes the event poison. Anything else (a registry that is down,
//! overloaded, misconfigured behind a proxy, or refusing our credentials) is not
//! the event's fault: it is waited out with capped exponential backoff, loudly.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backoff::Backoff;
use crate::config::RegistryConfig;
use crate::metrics;

/// Confluent's error code for "schema not found" (with HTTP 404).
const SCHEMA_NOT_FOUND: i64 = 40403;
/// Confluent's error codes for a subject, or a version of one, that does not exist.
const SUBJECT_NOT_FOUND: i64 = 40401;
const VERSION_NOT_FOUND: i64 = 40402;

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

/// A writer schema with the named types it refers to through Confluent schema
/// references (resolved recursively).
#[derive(Debug)]
pub struct WriterSchema {
    /// The schema the id names.
    pub schema: apache_avro::Schema,
    /// The referenced schemas, in which the schema's named references resolve.
    pub schemata: Vec<apache_avro::Schema>,
}

/// At most this many schemas are fetched for one id's references, so a reference
/// cycle or an absurd graph ends in an error rather than a loop.
const MAX_REFERENCES: usize = 256;

/// One answer of the registry, classified.
#[derive(Debug)]
enum Answer {
    /// The schema.
    Schema(SchemaById),
    /// Anything else.
    Failed(Failure),
}

/// An answer that is not a schema.
#[derive(Debug)]
enum Failure {
    /// 404 with error code 40403 (or 40401/40402 for a referenced subject version).
    NotFound,
    /// 200 with something that is not an Avro schema.
    NotAvro(String),
    /// Anything to wait out, with what happened.
    Unavailable(String),
}

/// What fetching an id and its references ended in.
enum Fetched {
    /// The schema's text and its referenced schemas' texts.
    Texts(String, Vec<String>),
    /// A failure, for the id (an empty name) or for the named reference.
    Failed(Failure, String),
}

/// The body of `GET /schemas/ids/{id}` and of `GET /subjects/{s}/versions/{v}`.
#[derive(Debug, serde::Deserialize)]
struct SchemaById {
    schema: String,
    #[serde(default, rename = "schemaType")]
    schema_type: Option<String>,
    #[serde(default)]
    references: Vec<Reference>,
}

/// A Confluent schema reference: a named type defined by a subject's version.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Deserialize)]
struct Reference {
    name: String,
    subject: String,
    version: i64,
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
    cache: Mutex<HashMap<u32, Arc<WriterSchema>>>,
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

    /// The writer schema with `id`, its references resolved. Blocks (retrying)
    /// while the registry is unavailable, until it answers or `keep_waiting`
    /// returns false. Call it from a thread that is not a tokio worker.
    pub fn schema(
        &self,
        id: u32,
        keep_waiting: &dyn Fn() -> bool,
    ) -> Result<Arc<WriterSchema>, RegistryError> {
        if let Some(schema) = self.cache.lock().expect("registry cache lock").get(&id) {
            return Ok(schema.clone());
        }
        let mut backoff = Backoff::new(Duration::from_millis(100), self.max_backoff);
        loop {
            let (failure, what) = match self.runtime.block_on(self.fetch_with_references(id)) {
                Fetched::Texts(text, referenced) => {
                    metrics::registry_request("ok");
                    let schema = Arc::new(parse(id, &text, &referenced)?);
                    self.cache
                        .lock()
                        .expect("registry cache lock")
                        .insert(id, schema.clone());
                    return Ok(schema);
                }
                Fetched::Failed(failure, what) => (failure, what),
            };
            match failure {
                Failure::NotAvro(message) => {
                    metrics::registry_request("ok");
                    return Err(RegistryError::BadSchema { id, message });
                }
                Failure::NotFound if what.is_empty() => {
                    metrics::registry_request("not_found");
                    return Err(RegistryError::UnknownId(id));
                }
                Failure::NotFound => {
                    metrics::registry_request("not_found");
                    return Err(RegistryError::BadSchema {
                        id,
                        message: format!("its reference {what} is not in the registry"),
                    });
                }
                Failure::Unavailable(why) => {
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

    /// The text of schema `id` and of every schema it references, transitively.
    async fn fetch_with_references(&self, id: u32) -> Fetched {
        let url = format!("{}/schemas/ids/{id}", self.base_url);
        let main = match self.fetch(&url, &[SCHEMA_NOT_FOUND]).await {
            Answer::Schema(found) => found,
            Answer::Failed(failure) => return Fetched::Failed(failure, String::new()),
        };
        let mut pending: Vec<Reference> = main.references.clone();
        let mut seen: HashSet<Reference> = HashSet::new();
        let mut referenced = Vec::new();
        while let Some(reference) = pending.pop() {
            if !seen.insert(reference.clone()) {
                continue;
            }
            let what = format!(
                "{} (subject {}, version {})",
                reference.name, reference.subject, reference.version
            );
            if seen.len() > MAX_REFERENCES {
                return Fetched::Failed(
                    Failure::NotAvro(format!("it refers to more than {MAX_REFERENCES} schemas")),
                    what,
                );
            }
            let url = match self.version_url(&reference) {
                Ok(url) => url,
                Err(e) => return Fetched::Failed(Failure::NotAvro(e), what),
            };
            match self
                .fetch(&url, &[SUBJECT_NOT_FOUND, VERSION_NOT_FOUND, SCHEMA_NOT_FOUND])
                .await
            {
                Answer::Schema(found) => {
                    pending.extend(found.references);
                    referenced.push(found.schema);
                }
                Answer::Failed(Failure::NotAvro(message)) => {
                    return Fetched::Failed(
                        Failure::NotAvro(format!("its reference {what}: {message}")),
                        what,
                    )
                }
                Answer::Failed(failure) => return Fetched::Failed(failure, what),
            }
        }
        Fetched::Texts(main.schema, referenced)
    }

    fn version_url(&self, reference: &Reference) -> Result<String, String> {
        let mut url = reqwest::Url::parse(&self.base_url).map_err(|e| e.to_string())?;
        url.path_segments_mut()
            .map_err(|()| "the registry URL cannot take a path".to_owned())?
            .pop_if_empty()
            .extend([
                "subjects",
                &reference.subject,
                "versions",
                &reference.version.to_string(),
            ]);
        Ok(url.to_string())
    }

    async fn fetch(&self, url: &str, not_found: &[i64]) -> Answer {
        let mut request = self
            .http
            .get(url)
            .header("Accept", "application/vnd.schemaregistry.v1+json");
        if let Some((user, password)) = &self.credentials {
            request = request.basic_auth(user, password.as_deref());
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) => return Answer::Failed(Failure::Unavailable(format!("GET {url}: {e}"))),
        };
        let status = response.status();
        let body = match response.bytes().await {
            Ok(body) => body,
            Err(e) => {
                return Answer::Failed(Failure::Unavailable(format!(
                    "GET {url}: {status}, reading the body: {e}"
                )))
            }
        };
        classify(url, status.as_u16(), &body, not_found)
    }
}

/// The schema of `id` from its text and its references' texts.
fn parse(id: u32, text: &str, referenced: &[String]) -> Result<WriterSchema, RegistryError> {
    let bad = |e: apache_avro::Error| RegistryError::BadSchema {
        id,
        message: e.to_string(),
    };
    if referenced.is_empty() {
        return Ok(WriterSchema {
            schema: apache_avro::Schema::parse_str(text).map_err(bad)?,
            schemata: Vec::new(),
        });
    }
    let (schema, schemata) = apache_avro::Schema::parse_str_with_list(text, referenced).map_err(bad)?;
    Ok(WriterSchema { schema, schemata })
}

/// What an answer with `status` and `body` means.
fn classify(url: &str, status: u16, body: &[u8], not_found: &[i64]) -> Answer {
    let unavailable = |why: String| Answer::Failed(Failure::Unavailable(why));
    match status {
        200 => match serde_json::from_slice::<SchemaById>(body) {
            Ok(found) => match found.schema_type.as_deref() {
                None | Some("AVRO") => Answer::Schema(found),
                Some(other) => Answer::Failed(Failure::NotAvro(format!("it is a {other} schema"))),
            },
            Err(e) => unavailable(format!("GET {url}: 200 with an unreadable body: {e}")),
        },
        404 => match serde_json::from_slice::<ErrorBody>(body) {
            Ok(error) if not_found.contains(&error.error_code) => Answer::Failed(Failure::NotFound),
            // A 404 without the registry's code is a wrong URL or a proxy, not a
            // missing schema: the events are fine.
            Ok(error) => unavailable(format!(
                "GET {url}: 404 with error code {} ({}); is registry.url right?",
                error.error_code, error.message
            )),
            Err(_) => unavailable(format!("GET {url}: 404 without a registry error; is registry.url right?")),
        },
        401 | 403 => unavailable(format!(
            "GET {url}: {status}: the registry refuses these credentials (registry.username, registry.password)"
        )),
        _ => unavailable(format!(
            "GET {url}: {status} {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str) -> Answer {
        classify(
            "http://r/schemas/ids/7",
            status,
            body.as_bytes(),
            &[SCHEMA_NOT_FOUND],
        )
    }

    #[test]
    fn only_a_404_with_code_40403_means_the_id_does_not_exist() {
        assert!(matches!(
            answer(404, r#"{"error_code":40403,"message":"Schema not found"}"#),
            Answer::Failed(Failure::NotFound)
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
                matches!(answer(status, body), Answer::Failed(Failure::Unavailable(_))),
                "{status} {body} is waited out"
            );
        }
    }

    #[test]
    fn a_schema_answer_is_avro_or_refused() {
        assert!(matches!(
            answer(200, r#"{"schema":"\"string\""}"#),
            Answer::Schema(s) if s.schema == "\"string\"" && s.references.is_empty()
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
            Answer::Failed(Failure::NotAvro(_))
        ));
    }
}
