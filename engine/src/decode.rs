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
use crate::logical::Plain;
use crate::poison::PoisonReason;
use crate::registry_client::{RegistryClient, RegistryError, WriterSchema};
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

/// How to decode messages written with one writer schema: a record (one event
/// type) or a union of records (one per branch, Confluent's way of putting several
/// event types in one topic under its default subject name strategy).
#[derive(Debug)]
pub struct DecodePlan {
    writer: Arc<WriterSchema>,
    /// Every named type the writer may refer to, when it refers to any by name
    /// (otherwise decoding needs no table of names).
    schemata: Option<Vec<Schema>>,
    /// The writer is a union: the datum is a branch index, then that branch.
    union: bool,
    /// One per branch of a union writer (or why the branch is not an event we can
    /// read); just one for a record writer.
    branches: Vec<Result<Branch, String>>,
    /// What the writer is, for error messages: the event type, or the union.
    label: String,
}

/// How to bring the events of one record schema to their current version.
#[derive(Debug)]
struct Branch {
    /// Full name of the writer's event type.
    event_name: Arc<str>,
    /// Set when the writer schema is not byte-for-byte a known version, so values
    /// must be resolved into that version's shape.
    reader: Option<Schema>,
    /// The known version the decoded data is in; `None` for types the schema set
    /// does not know, which are passed through.
    version: Option<u32>,
    /// For a passed-through type: gives its logical values their meaning.
    plain: Option<Plain>,
}

/// Decodes messages of any writer schema, caching one plan per schema id, and
/// upcasts them to the current version.
pub struct Decoder {
    registry: Arc<RegistryClient>,
    schemas: Arc<SchemaSet>,
    plans: HashMap<u32, Arc<DecodePlan>>,
    /// Writer schemas of Avro keys by id; `None` for an id the registry does not
    /// know, so a key that merely looks like a frame is read as bytes.
    key_schemas: HashMap<u32, Option<Arc<KeySchema>>>,
}

/// How to turn Avro keys of one writer schema into text.
struct KeySchema {
    writer: Arc<WriterSchema>,
    plain: Option<Plain>,
}

impl Decoder {
    /// A decoder that fetches writer schemas from `registry` and brings events to
    /// the current versions of `schemas`.
    pub fn new(registry: Arc<RegistryClient>, schemas: Arc<SchemaSet>) -> Self {
        Decoder {
            registry,
            schemas,
            plans: HashMap::new(),
            key_schemas: HashMap::new(),
        }
    }

    /// A record key as text: a Confluent-framed Avro key is decoded with its writer
    /// schema and written as JSON (a string key as the plain string, logical types
    /// in their meaning); other valid UTF-8 as it is; anything else as base64.
    pub fn decode_key(
        &mut self,
        key: Option<&[u8]>,
        keep_waiting: &dyn Fn() -> bool,
    ) -> Result<Option<Arc<str>>, DecodeError> {
        let Some(bytes) = key else {
            return Ok(None);
        };
        if let Ok(frame) = frame::parse(Some(bytes)) {
            if let Some(text) = self.avro_key(frame.schema_id, frame.body, keep_waiting)? {
                return Ok(Some(text.into()));
            }
        }
        Ok(Some(match std::str::from_utf8(bytes) {
            Ok(text) => text.into(),
            Err(_) => {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD.encode(bytes).into()
            }
        }))
    }

    /// The JSON text of an Avro key, or `None` when these bytes are not one (an
    /// id the registry does not know, or a body that does not decode exactly).
    fn avro_key(
        &mut self,
        schema_id: u32,
        mut body: &[u8],
        keep_waiting: &dyn Fn() -> bool,
    ) -> Result<Option<String>, DecodeError> {
        let schema = match self.key_schemas.get(&schema_id) {
            Some(known) => known.clone(),
            None => {
                let found = match self.registry.schema(schema_id, keep_waiting) {
                    Ok(writer) => Some(Arc::new(KeySchema {
                        plain: Plain::for_schema(&writer.schema, &writer.schemata),
                        writer,
                    })),
                    Err(RegistryError::UnknownId(_) | RegistryError::BadSchema { .. }) => None,
                    Err(e @ (RegistryError::Interrupted(_) | RegistryError::Client(_))) => {
                        return Err(DecodeError::Interrupted(e.to_string()))
                    }
                };
                self.key_schemas.insert(schema_id, found.clone());
                found
            }
        };
        let Some(schema) = schema else {
            return Ok(None);
        };
        let writer = &schema.writer;
        let decoded = crate::panics::contained(|| {
            apache_avro::from_avro_datum_schemata(
                &writer.schema,
                writer.schemata.iter().collect(),
                &mut body,
                None,
            )
        });
        let value = match decoded {
            Ok(Ok(value)) if body.is_empty() => value,
            _ => return Ok(None),
        };
        let value = match &schema.plain {
            Some(plain) => match plain.convert(value) {
                Ok(value) => value,
                Err(_) => return Ok(None),
            },
            None => value,
        };
        Ok(match crate::avro_json::to_json(value) {
            Ok(serde_json::Value::String(text)) => Some(text),
            Ok(json) => Some(json.to_string()),
            Err(_) => None,
        })
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
        decode_body(&plan, frame.schema_id, frame.body, &self.schemas)
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

/// Decodes an Avro datum with its writer schema and brings it to the current
/// version; every failure is a poison error naming the schema id.
fn decode_body(
    plan: &DecodePlan,
    schema_id: u32,
    mut body: &[u8],
    schemas: &SchemaSet,
) -> Result<Vec<CurrentEvent>, DecodeError> {
    let failed = |what: &dyn std::fmt::Display| {
        DecodeError::poison(
            PoisonReason::DecodeFailed,
            format!("{} (schema id {schema_id}): {what}", plan.label),
        )
    };
    // A record writer's reader schema is applied while decoding; a union's, once
    // the branch is known.
    let record_reader = match (plan.union, plan.branches.first()) {
        (false, Some(Ok(branch))) => branch.reader.as_ref(),
        _ => None,
    };
    let writer = &plan.writer.schema;
    let decoded = crate::panics::contained(|| match &plan.schemata {
        // No named references to look up: skip building the table of names,
        // which `from_avro_datum` does for every datum.
        None => apache_avro::from_avro_datum_schemata(writer, Vec::new(), &mut body, record_reader),
        Some(schemata) => {
            apache_avro::from_avro_datum_schemata(writer, schemata.iter().collect(), &mut body, record_reader)
        }
    })
    .map_err(|panic| failed(&panic))?;
    let payload = decoded.map_err(|e| failed(&e))?;
    if !body.is_empty() {
        return Err(failed(&format!(
            "{} bytes left over after the Avro datum",
            body.len()
        )));
    }
    let (index, payload) = match (plan.union, payload) {
        (false, payload) => (0, payload),
        (true, apache_avro::types::Value::Union(index, branch)) => (index as usize, *branch),
        (true, other) => return Err(failed(&format!("a union writer decoded to {other:?}"))),
    };
    let branch = match plan.branches.get(index) {
        Some(Ok(branch)) => branch,
        Some(Err(why)) => {
            return Err(DecodeError::poison(
                PoisonReason::UnknownSchema,
                format!("schema id {schema_id}: {why}"),
            ))
        }
        None => return Err(failed(&format!("no branch {index} in the writer union"))),
    };
    let payload = match (plan.union, &branch.reader) {
        (true, Some(reader)) => payload
            .resolve(reader)
            .map_err(|e| failed(&format!("{}: {e}", branch.event_name)))?,
        _ => payload,
    };
    match branch.version {
        None => {
            let payload = match &branch.plain {
                Some(plain) => plain
                    .convert(payload)
                    .map_err(|e| failed(&format!("{}: {e}", branch.event_name)))?,
                None => payload,
            };
            Ok(vec![CurrentEvent {
                name: branch.event_name.clone(),
                payload,
            }])
        }
        // An upcaster is user code (CEL rules, Rust upcasters): a panic in it is
        // this event's `upcast_failed`, not the end of the decoding thread.
        Some(version) => {
            match crate::panics::contained(|| schemas.upcast(&branch.event_name, version, payload)) {
                Ok(Ok(events)) => Ok(events),
                Ok(Err(e)) => Err(DecodeError::poison(PoisonReason::UpcastFailed, e.to_string())),
                Err(panic) => Err(DecodeError::poison(PoisonReason::UpcastFailed, panic)),
            }
        }
    }
}

fn plan_for(
    schema_id: u32,
    writer: Arc<WriterSchema>,
    schemas: &SchemaSet,
) -> Result<DecodePlan, DecodeError> {
    let refers = refers_by_name(&writer.schema) || !writer.schemata.is_empty();
    // Every named type of the writer and its references, to look branches up in.
    let mut names: Vec<Schema> = writer.schemata.clone();
    names.push(writer.schema.clone());
    let lookup = |schema: &Schema| -> Option<Schema> {
        match schema {
            Schema::Ref { name } => named(&names, name),
            other => Some(other.clone()),
        }
    };
    let (union, branches, label) = match &writer.schema {
        Schema::Record(record) => {
            let branch = branch_for(record, &writer.schema, &names, schemas).map_err(|why| {
                DecodeError::poison(
                    PoisonReason::UnknownSchema,
                    format!("schema id {schema_id}: {why}"),
                )
            })?;
            (false, vec![Ok(branch)], record.name.fullname(None))
        }
        Schema::Union(union) => {
            let branches = union
                .variants()
                .iter()
                .enumerate()
                .map(|(index, variant)| match lookup(variant) {
                    Some(Schema::Record(record)) => {
                        branch_for(&record, &Schema::Record(record.clone()), &names, schemas)
                    }
                    _ => Err(format!(
                        "branch {index} of the writer union is not a record, so not an event"
                    )),
                })
                .collect();
            let label = format!("a union of {} types", union.variants().len());
            (true, branches, label)
        }
        _ => {
            return Err(DecodeError::poison(
                PoisonReason::UnknownSchema,
                format!("schema id {schema_id} is neither a record nor a union of records, so not an event"),
            ))
        }
    };
    Ok(DecodePlan {
        schemata: refers.then_some(names),
        writer,
        union,
        branches,
        label,
    })
}

/// The definition of the named type `name` among `schemata`, searched in depth.
fn named(schemata: &[Schema], name: &apache_avro::schema::Name) -> Option<Schema> {
    let mut names = HashMap::new();
    schemata
        .iter()
        .for_each(|schema| crate::logical::collect_names(schema, &mut names));
    names.remove(name)
}

/// How to decode a record writer schema (standalone or a union's branch), or why
/// its events cannot be read.
fn branch_for(
    definition: &apache_avro::schema::RecordSchema,
    record: &Schema,
    names: &[Schema],
    schemas: &SchemaSet,
) -> Result<Branch, String> {
    let event_name: Arc<str> = definition.name.fullname(None).into();
    let (reader, version) = match schemas.identify(record) {
        WriterMatch::Known { version, reader, .. } => (reader, Some(version)),
        WriterMatch::Unregistered => (None, None),
        WriterMatch::Unknown(why) => return Err(why),
    };
    let plain = match version {
        Some(_) => None,
        None => Plain::for_schema(record, names),
    };
    Ok(Branch {
        event_name,
        reader,
        version,
        plain,
    })
}

/// True when `schema` uses a named type by reference anywhere.
fn refers_by_name(schema: &Schema) -> bool {
    match schema {
        Schema::Ref { .. } => true,
        Schema::Array(array) => refers_by_name(&array.items),
        Schema::Map(map) => refers_by_name(&map.types),
        Schema::Union(union) => union.variants().iter().any(refers_by_name),
        Schema::Record(record) => record.fields.iter().any(|f| refers_by_name(&f.schema)),
        _ => false,
    }
}

#[cfg(test)]
mod tests;
