//! Writer schemas by id, from a Confluent-compatible schema registry, cached.
//!
//! A schema id never changes meaning, so a fetched schema is cached for the life of
//! the process. A registry that is down is waited for (capped exponential backoff),
//! never treated as a bad event.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use schema_registry_converter::async_impl::schema_registry::{get_schema_by_id, SrSettings};
use schema_registry_converter::error::SRCError;

use crate::config::RegistryConfig;
use crate::metrics;

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

/// Cached registry client.
pub struct RegistryClient {
    settings: SrSettings,
    max_backoff: Duration,
    cache: Mutex<HashMap<u32, Arc<apache_avro::Schema>>>,
    runtime: tokio::runtime::Handle,
}

impl RegistryClient {
    /// A client for `config`; requests run on `runtime`.
    pub fn new(config: &RegistryConfig, runtime: tokio::runtime::Handle) -> Result<Self, RegistryError> {
        let mut builder = SrSettings::new_builder(config.url.trim_end_matches('/').to_owned());
        builder.set_timeout(Duration::from_millis(config.timeout_ms));
        if let Some(user) = &config.username {
            builder.set_basic_authorization(user, config.password.as_deref());
        }
        let settings = builder
            .build()
            .map_err(|e| RegistryError::Client(e.error.clone()))?;
        Ok(RegistryClient {
            settings,
            max_backoff: Duration::from_millis(config.max_backoff_ms.max(1)),
            cache: Mutex::new(HashMap::new()),
            runtime,
        })
    }

    /// The writer schema with `id`. Blocks (retrying) while the registry is
    /// unreachable, until it answers or `keep_waiting` returns false. Call it from a
    /// thread that is not a tokio worker.
    pub fn schema(
        &self,
        id: u32,
        keep_waiting: &dyn Fn() -> bool,
    ) -> Result<Arc<apache_avro::Schema>, RegistryError> {
        if let Some(schema) = self.cache.lock().expect("registry cache lock").get(&id) {
            return Ok(schema.clone());
        }
        let mut backoff = Duration::from_millis(100);
        loop {
            let answer = self.runtime.block_on(get_schema_by_id(id, &self.settings));
            match answer {
                Ok(registered) => {
                    metrics::registry_request("ok");
                    let schema = apache_avro::Schema::parse_str(&registered.schema).map_err(|e| {
                        RegistryError::BadSchema {
                            id,
                            message: e.to_string(),
                        }
                    })?;
                    let schema = Arc::new(schema);
                    self.cache
                        .lock()
                        .expect("registry cache lock")
                        .insert(id, schema.clone());
                    return Ok(schema);
                }
                Err(error) if is_not_found(&error) => {
                    metrics::registry_request("not_found");
                    return Err(RegistryError::UnknownId(id));
                }
                Err(error) => {
                    metrics::registry_request("error");
                    if !keep_waiting() {
                        return Err(RegistryError::Interrupted(describe(&error)));
                    }
                    tracing::warn!(
                        schema_id = id,
                        retry_in_ms = backoff.as_millis() as u64,
                        error = %describe(&error),
                        "schema registry unavailable; retrying"
                    );
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(self.max_backoff);
                }
            }
        }
    }
}

/// 404 with Confluent's "schema not found" code; anything else may be transient.
fn is_not_found(error: &SRCError) -> bool {
    !error.retriable
        && error
            .cause
            .as_deref()
            .is_some_and(|cause| cause.contains("error_code: 40403"))
}

fn describe(error: &SRCError) -> String {
    match &error.cause {
        Some(cause) => format!("{}: {cause}", error.error),
        None => error.error.clone(),
    }
}
