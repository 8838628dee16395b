//! From a Kafka value to an event in its current schema version.
//!
//! The work that depends only on the writer schema (fetching it, naming the event
//! type, finding its version in the schema set) is done once per schema id and
//! kept as a [`DecodePlan`]; each message then costs one Avro decode, plus the
//! upcasters when it is of an old version.

use std::collections::HashMap;
use std::sync::Arc;

use apache_avro::Schema;

use crate::frame::{self, FrameError};
use crate::poison::PoisonReason;
use crate::registry_client::{RegistryClient, RegistryError};
use crate::schemas::{CurrentEvent, SchemaSet, WriterMatch};

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
    /// Full name of the writer's event type.
    pub event_name: Arc<str>,
    writer: Arc<Schema>,
    /// Set when the writer schema is not byte-for-byte a known version, so values
    /// must be resolved into that version's shape.
    reader: Option<Schema>,
    /// The known version the decoded data is in; `None` for types the schema set
    /// does not know, which are passed through.
    version: Option<u32>,
}

/// Decodes messages of any writer schema, caching one plan per schema id, and
/// upcasts them to the current version.
pub struct Decoder {
    registry: Arc<RegistryClient>,
    schemas: Arc<SchemaSet>,
    plans: HashMap<u32, Arc<DecodePlan>>,
}

impl Decoder {
    /// A decoder that fetches writer schemas from `registry` and brings events to
    /// the current versions of `schemas`.
    pub fn new(registry: Arc<RegistryClient>, schemas: Arc<SchemaSet>) -> Self {
        Decoder {
            registry,
            schemas,
            plans: HashMap::new(),
        }
    }

    /// Decodes one Kafka value into zero or more events of the current version (an
    /// upcaster may split or drop an event).
    pub fn decode(
        &mut self,
        value: Option<&[u8]>,
        keep_waiting: &dyn Fn() -> bool,
    ) -> Result<Vec<CurrentEvent>, DecodeError> {
        let frame = frame::parse(value).map_err(|e| match e {
            FrameError::NullValue | FrameError::TooShort(_) | FrameError::BadMagic(_) => {
                DecodeError::poison(PoisonReason::BadFrame, e.to_string())
            }
        })?;
        let plan = self.plan(frame.schema_id, keep_waiting)?;
        let mut body = frame.body;
        let payload =
            apache_avro::from_avro_datum(&plan.writer, &mut body, plan.reader.as_ref()).map_err(|e| {
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
        match plan.version {
            None => Ok(vec![CurrentEvent {
                name: plan.event_name.clone(),
                payload,
            }]),
            Some(version) => self
                .schemas
                .upcast(&plan.event_name, version, payload)
                .map_err(|e| DecodeError::poison(PoisonReason::UpcastFailed, e)),
        }
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
        let plan = Arc::new(plan_for(schema_id, writer, &self.schemas)?);
        self.plans.insert(schema_id, plan.clone());
        Ok(plan)
    }
}

fn plan_for(schema_id: u32, writer: Arc<Schema>, schemas: &SchemaSet) -> Result<DecodePlan, DecodeError> {
    let event_name: Arc<str> = match writer.as_ref() {
        Schema::Record(record) => record.name.fullname(None).into(),
        _ => {
            return Err(DecodeError::poison(
                PoisonReason::UnknownSchema,
                format!("schema id {schema_id} is not a record, so not an event"),
            ))
        }
    };
    let (reader, version) = match schemas.identify(&writer) {
        WriterMatch::Known { version, reader, .. } => (reader, Some(version)),
        WriterMatch::Unregistered => (None, None),
        WriterMatch::Unknown(why) => {
            return Err(DecodeError::poison(
                PoisonReason::UnknownSchema,
                format!("schema id {schema_id}: {why}"),
            ))
        }
    };
    Ok(DecodePlan {
        event_name,
        writer,
        reader,
        version,
    })
}
