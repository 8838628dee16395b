//! From a Kafka value to an event in its current schema version.
//!
//! The work that depends only on the writer schema (fetching it, naming the event
//! type, finding and checking the reader schema) is done once per schema id and
//! kept as a [`DecodePlan`]; each message then costs one Avro decode.

use std::collections::HashMap;
use std::sync::Arc;

use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::types::Value;
use apache_avro::Schema;

use crate::frame::{self, FrameError};
use crate::poison::PoisonReason;
use crate::registry_client::{RegistryClient, RegistryError};
use crate::schemas::ReaderSchemas;

/// Why a message could not be decoded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DecodeError {
    /// The event is bad: it goes to the poison policy.
    #[error("{reason}: {message}")]
    Poison {
        /// The poison reason.
        reason: PoisonReason,
        /// What exactly is wrong.
        message: String,
    },
    /// The worker is stopping while the registry is unreachable; retry later.
    #[error("{0}")]
    Interrupted(String),
}

impl DecodeError {
    fn poison(reason: PoisonReason, message: impl Into<String>) -> Self {
        DecodeError::Poison {
            reason,
            message: message.into(),
        }
    }
}

/// How to decode messages written with one writer schema.
#[derive(Debug)]
pub struct DecodePlan {
    /// Full name of the event type.
    pub event_name: Arc<str>,
    writer: Arc<Schema>,
    /// Set when the writer schema differs from the reader schema, so values must be
    /// resolved into the reader's shape.
    reader: Option<Schema>,
}

/// A decoded event.
#[derive(Debug)]
pub struct Decoded {
    /// Full name of the event type.
    pub event_name: Arc<str>,
    /// The payload in the reader schema.
    pub payload: Value,
}

/// Decodes messages of any writer schema, caching one plan per schema id.
pub struct Decoder {
    registry: Arc<RegistryClient>,
    readers: Arc<ReaderSchemas>,
    plans: HashMap<u32, Arc<DecodePlan>>,
}

impl Decoder {
    /// A decoder that fetches writer schemas from `registry` and resolves them to
    /// `readers`.
    pub fn new(registry: Arc<RegistryClient>, readers: Arc<ReaderSchemas>) -> Self {
        Decoder {
            registry,
            readers,
            plans: HashMap::new(),
        }
    }

    /// Decodes one Kafka value.
    pub fn decode(
        &mut self,
        value: Option<&[u8]>,
        keep_waiting: &dyn Fn() -> bool,
    ) -> Result<Decoded, DecodeError> {
        let frame = frame::parse(value).map_err(|e| match e {
            FrameError::NullValue | FrameError::TooShort(_) | FrameError::BadMagic(_) => {
                DecodeError::poison(PoisonReason::BadFrame, e.to_string())
            }
        })?;
        let plan = self.plan(frame.schema_id, keep_waiting)?;
        let mut body = frame.body;
        let payload = apache_avro::from_avro_datum(&plan.writer, &mut body, plan.reader.as_ref())
            .map_err(|e| {
            DecodeError::poison(
                PoisonReason::DecodeFailed,
                format!("{} (schema id {}): {e}", plan.event_name, frame.schema_id),
            )
        })?;
        if !body.is_empty() {
            return Err(DecodeError::poison(
                PoisonReason::DecodeFailed,
                format!(
                    "{} (schema id {}): {} bytes left over after the Avro datum",
                    plan.event_name,
                    frame.schema_id,
                    body.len()
                ),
            ));
        }
        Ok(Decoded {
            event_name: plan.event_name.clone(),
            payload,
        })
    }

    fn plan(
        &mut self,
        schema_id: u32,
        keep_waiting: &dyn Fn() -> bool,
    ) -> Result<Arc<DecodePlan>, DecodeError> {
        if let Some(plan) = self.plans.get(&schema_id) {
            return Ok(plan.clone());
        }
        let writer = self
            .registry
            .schema(schema_id, keep_waiting)
            .map_err(|e| match e {
                RegistryError::UnknownId(_) => {
                    DecodeError::poison(PoisonReason::UnknownSchemaId, e.to_string())
                }
                RegistryError::BadSchema { .. } => {
                    DecodeError::poison(PoisonReason::UnknownSchema, e.to_string())
                }
                RegistryError::Interrupted(_) | RegistryError::Client(_) => {
                    DecodeError::Interrupted(e.to_string())
                }
            })?;
        let plan = Arc::new(plan_for(schema_id, writer, &self.readers)?);
        self.plans.insert(schema_id, plan.clone());
        Ok(plan)
    }
}

fn plan_for(
    schema_id: u32,
    writer: Arc<Schema>,
    readers: &ReaderSchemas,
) -> Result<DecodePlan, DecodeError> {
    let event_name: Arc<str> = match writer.as_ref() {
        Schema::Record(record) => record.name.fullname(None).into(),
        other => {
            return Err(DecodeError::poison(
                PoisonReason::UnknownSchema,
                format!("schema id {schema_id} is a {other:?}, not an event record"),
            ))
        }
    };
    let reader = match readers.current(&event_name) {
        // An event type the schema set does not know is passed through as written.
        None => None,
        Some(current) if current.schema.canonical_form() == writer.canonical_form() => None,
        Some(current) => {
            SchemaCompatibility::can_read(&writer, &current.schema).map_err(|e| {
                DecodeError::poison(
                    PoisonReason::UnknownSchema,
                    format!(
                        "schema id {schema_id} ({event_name}) cannot be read as {} v{}: {e}",
                        current.path.display(),
                        current.version
                    ),
                )
            })?;
            Some(current.schema.clone())
        }
    };
    Ok(DecodePlan {
        event_name,
        writer,
        reader,
    })
}
