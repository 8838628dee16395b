//! The event schema set: every version of every event type, and the upcasters
//! between them, read from `schemas/`.
//!
//! Layout: `<dir>/<namespace>/<Name>.v<N>.avsc` for each version and
//! `<dir>/<namespace>/<Name>.upcast.toml` for the steps between them (see
//! [`upcast`]). The newest version of a type is what projections see. A type with
//! no files is passed through as its writer wrote it.

mod check;
pub mod upcast;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::types::Value;
use apache_avro::Schema;

use crate::avro_json;
use crate::logical::{LogicalError, Plain};
use crate::metrics;
pub use upcast::{RustUpcaster, RustUpcasters, Step, StepError, UpcastError, UpcastOutput};

/// A schema set that could not be loaded or checked; names the file.
#[derive(Debug, thiserror::Error)]
#[error("schemas {}: {message}", path.display())]
pub struct SchemaSetError {
    /// The file or directory at fault.
    pub path: PathBuf,
    /// What is wrong with it.
    pub message: String,
}

fn error_at(path: &Path, message: impl Into<String>) -> SchemaSetError {
    SchemaSetError {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// One version of one event type.
#[derive(Debug, Clone)]
pub struct SchemaVersion {
    /// Version number from the file name.
    pub version: u32,
    /// The parsed schema.
    pub schema: Schema,
    /// Its parsing canonical form, which identifies it.
    pub canonical: String,
    /// The file it came from.
    pub path: PathBuf,
    /// Builds values of this schema from upcasters' JSON.
    pub from_json: avro_json::JsonToAvro,
    /// Gives logical-type values their meaning; `None` when the schema has none.
    pub plain: Option<Plain>,
}

impl SchemaVersion {
    /// `payload` with logical-type values in their meaning (see [`crate::logical`]).
    fn plain(&self, payload: Value) -> Result<Value, LogicalError> {
        match &self.plain {
            Some(plain) => plain.convert(payload),
            None => Ok(payload),
        }
    }
}

/// Every version of one event type and the steps out of them.
#[derive(Debug)]
pub struct EventType {
    /// Full Avro name.
    pub name: Arc<str>,
    versions: BTreeMap<u32, SchemaVersion>,
    steps: BTreeMap<u32, Step>,
}

impl EventType {
    /// A payload of `version` with its logical values in their meaning.
    fn in_meaning(&self, version: u32, payload: Value) -> Result<Value, UpcastError> {
        match self.versions.get(&version) {
            Some(schema) => schema.plain(payload).map_err(|source| UpcastError::Logical {
                event: self.name.to_string(),
                version,
                source,
            }),
            None => Ok(payload),
        }
    }

    /// The newest version.
    pub fn current(&self) -> &SchemaVersion {
        self.versions
            .values()
            .next_back()
            .expect("a type has at least one version")
    }
}

/// How a writer schema relates to the schema set.
#[derive(Debug, Clone)]
pub enum WriterMatch {
    /// A known version: decode with `reader` when set (the writer differs from the
    /// version's file but resolves to it), then upcast from `version`.
    Known {
        /// Event type.
        name: Arc<str>,
        /// Version of the data once decoded.
        version: u32,
        /// Reader schema for Avro resolution, when the writer is not the file itself.
        reader: Option<Schema>,
    },
    /// A type the set does not know: decoded with the writer schema, passed through.
    Unregistered,
    /// A known type, but this writer schema matches none of its versions.
    Unknown(String),
}

/// An event after upcasting.
#[derive(Debug, Clone, PartialEq)]
pub struct CurrentEvent {
    /// Full name of its type.
    pub name: Arc<str>,
    /// Payload in the type's newest schema.
    pub payload: Value,
}

/// The loaded schema set.
#[derive(Debug, Default)]
pub struct SchemaSet {
    types: HashMap<String, EventType>,
}

impl SchemaSet {
    /// Loads every schema and upcast file under `dir`; Rust steps are looked up in
    /// `rust`. Use [`SchemaSet::check`] to prove every version reaches the newest.
    pub fn load(dir: &Path, rust: &RustUpcasters) -> Result<SchemaSet, SchemaSetError> {
        let mut files = Vec::new();
        collect_files(dir, &mut files).map_err(|e| error_at(dir, e.to_string()))?;
        let mut types: HashMap<String, EventType> = HashMap::new();
        let mut upcast_files = Vec::new();
        for path in files {
            let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if let Some(type_name) = file_name.strip_suffix(".upcast.toml") {
                upcast_files.push((path.clone(), type_name.to_owned()));
                continue;
            }
            if !file_name.ends_with(".avsc") {
                continue;
            }
            let version = version_from_file_name(&path)
                .ok_or_else(|| error_at(&path, "file name must be `<Name>.v<N>.avsc`"))?;
            let text = std::fs::read_to_string(&path).map_err(|e| error_at(&path, e.to_string()))?;
            let schema = Schema::parse_str(&text).map_err(|e| error_at(&path, e.to_string()))?;
            let name = match &schema {
                Schema::Record(record) => record.name.fullname(None),
                _ => return Err(error_at(&path, "an event schema must be a record")),
            };
            let stem = file_name.split(".v").next().unwrap_or_default();
            if !name.ends_with(&format!(".{stem}")) && name != stem {
                return Err(error_at(
                    &path,
                    format!("declares {name}, but the file is named for {stem}"),
                ));
            }
            let entry = types.entry(name.clone()).or_insert_with(|| EventType {
                name: name.as_str().into(),
                versions: BTreeMap::new(),
                steps: BTreeMap::new(),
            });
            let canonical = schema.canonical_form();
            if let Some(existing) = entry.versions.get(&version) {
                return Err(error_at(
                    &path,
                    format!("{name} v{version} is also defined in {}", existing.path.display()),
                ));
            }
            let from_json =
                avro_json::JsonToAvro::new(&schema).map_err(|e| error_at(&path, e.to_string()))?;
            let plain = Plain::for_schema(&schema, &[]);
            entry.versions.insert(
                version,
                SchemaVersion {
                    version,
                    schema,
                    canonical,
                    path,
                    from_json,
                    plain,
                },
            );
        }
        for (path, type_name) in upcast_files {
            let namespace = path
                .parent()
                .and_then(|p| p.file_name())
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let full_name = format!("{namespace}.{type_name}");
            let event_type = types.get_mut(&full_name).ok_or_else(|| {
                error_at(
                    &path,
                    format!("upcasters for {full_name}, which has no schema file here"),
                )
            })?;
            for step in upcast::load_steps(&path, &full_name, rust).map_err(|e| error_at(&path, e))? {
                if !event_type.versions.contains_key(&step.from) {
                    return Err(error_at(
                        &path,
                        format!(
                            "step {} reads v{}, but there is no {full_name}.v{}.avsc",
                            step.index, step.from, step.from
                        ),
                    ));
                }
                if let Some(other) = event_type.steps.get(&step.from) {
                    return Err(error_at(
                        &path,
                        format!(
                            "steps {} and {} both read v{}",
                            other.index, step.index, step.from
                        ),
                    ));
                }
                event_type.steps.insert(step.from, step);
            }
        }
        Ok(SchemaSet { types })
    }

    pub(super) fn version(&self, name: &str, version: u32) -> Option<&SchemaVersion> {
        self.types.get(name)?.versions.get(&version)
    }

    /// The event type `name`, if the set knows it.
    #[cfg(test)]
    pub fn event_type(&self, name: &str) -> Option<&EventType> {
        self.types.get(name)
    }

    /// The precision of `field` in the current version of `event` (`*`: of any
    /// type, the largest) when it is a `decimal`.
    pub fn decimal_precision(&self, event: &str, field: &str) -> Option<usize> {
        let of = |event_type: &EventType| match &event_type.current().schema {
            Schema::Record(record) => record
                .lookup
                .get(field)
                .and_then(|index| decimal_in(&record.fields[*index].schema)),
            _ => None,
        };
        match event {
            "*" => self.types.values().filter_map(of).max(),
            name => self.types.get(name).and_then(of),
        }
    }

    /// Number of event types, versions and steps.
    pub fn counts(&self) -> (usize, usize, usize) {
        let versions = self.types.values().map(|t| t.versions.len()).sum();
        let steps = self.types.values().map(|t| t.steps.len()).sum();
        (self.types.len(), versions, steps)
    }

    /// Finds which version a writer schema is. An exact match (same parsing
    /// canonical form: differences in docs or formatting do not count) wins; else
    /// the versions the writer resolves to under Avro schema resolution, preferring
    /// one with exactly the writer's field names (a reordering), else the newest.
    pub fn identify(&self, writer: &Schema) -> WriterMatch {
        let Schema::Record(record) = writer else {
            return WriterMatch::Unknown("the writer schema is not a record".into());
        };
        let name = record.name.fullname(None);
        let Some(event_type) = self.types.get(&name) else {
            return WriterMatch::Unregistered;
        };
        let canonical = writer.canonical_form();
        if let Some(version) = event_type.versions.values().find(|v| v.canonical == canonical) {
            return WriterMatch::Known {
                name: event_type.name.clone(),
                version: version.version,
                reader: None,
            };
        }
        let writer_fields: HashSet<&str> = record.fields.iter().map(|f| f.name.as_str()).collect();
        let readable: Vec<&SchemaVersion> = event_type
            .versions
            .values()
            .filter(|v| SchemaCompatibility::can_read(writer, &v.schema).is_ok())
            .collect();
        let same_fields = readable.iter().find(|v| match &v.schema {
            Schema::Record(r) => {
                r.fields.iter().map(|f| f.name.as_str()).collect::<HashSet<_>>() == writer_fields
            }
            _ => false,
        });
        match same_fields.or(readable.last()) {
            Some(version) => WriterMatch::Known {
                name: event_type.name.clone(),
                version: version.version,
                reader: Some(version.schema.clone()),
            },
            None => WriterMatch::Unknown(format!(
                "this writer schema of {name} matches none of its {} known versions and resolves to none",
                event_type.versions.len()
            )),
        }
    }

    /// Brings a decoded payload of `name` v`version` to the current version of its
    /// type (or of the types it becomes), with logical-type values in their
    /// meaning (see [`crate::logical`]); upcasters see them so too. Zero events
    /// when an upcaster dropped it.
    pub fn upcast(
        &self,
        name: &Arc<str>,
        version: u32,
        payload: Value,
    ) -> Result<Vec<CurrentEvent>, UpcastError> {
        let Some(event_type) = self.types.get(name.as_ref()) else {
            return Ok(vec![CurrentEvent {
                name: name.clone(),
                payload,
            }]);
        };
        if !event_type.steps.contains_key(&version) {
            // Already current (`check` proved every older version has a step):
            // the common case, without the machinery below.
            return Ok(vec![CurrentEvent {
                name: event_type.name.clone(),
                payload: event_type.in_meaning(version, payload)?,
            }]);
        }
        // Each step's outputs are checked against, and completed with the defaults
        // of, their target version before the next step reads them.
        let mut pending = vec![(event_type, version, payload)];
        let mut done = Vec::new();
        while let Some((event_type, version, payload)) = pending.pop() {
            let schema = event_type
                .versions
                .get(&version)
                .ok_or_else(|| UpcastError::NoSchema {
                    step: "decoding".to_owned(),
                    event: event_type.name.to_string(),
                    version,
                })?;
            let payload = schema.plain(payload).map_err(|source| UpcastError::Logical {
                event: event_type.name.to_string(),
                version,
                source,
            })?;
            let Some(step) = event_type.steps.get(&version) else {
                if event_type.current().version != version {
                    return Err(UpcastError::NoPath {
                        event: event_type.name.to_string(),
                        version,
                    });
                }
                done.push(CurrentEvent {
                    name: event_type.name.clone(),
                    payload,
                });
                continue;
            };
            let produced = match step.as_transform() {
                // The common step works on the decoded record itself.
                Some(transform) => {
                    let target = self.target_of(step, transform.to_event, transform.to_version)?;
                    let fields = transform.apply(payload).map_err(|source| UpcastError::Step {
                        step: step.describe(),
                        source,
                    })?;
                    match fields {
                        None => Vec::new(),
                        Some(fields) => {
                            let value = target.1.from_json.record(fields).map_err(|source| {
                                UpcastError::InvalidOutput {
                                    step: step.describe(),
                                    event: transform.to_event.to_owned(),
                                    version: transform.to_version,
                                    source,
                                }
                            })?;
                            vec![(target.0, transform.to_version, value)]
                        }
                    }
                }
                None => self.upcast_as_json(step, payload)?,
            };
            if done.len() + pending.len() + produced.len() > 64 {
                return Err(UpcastError::TooMany {
                    step: step.describe(),
                });
            }
            for (target, target_version, value) in produced.into_iter().rev() {
                metrics::UPCASTS
                    .with_label_values(&[
                        event_type.name.as_ref(),
                        &version.to_string(),
                        &target_version.to_string(),
                    ])
                    .inc();
                pending.push((target, target_version, value));
            }
        }
        Ok(done)
    }

    /// The type and schema version `step` produces.
    fn target_of(
        &self,
        step: &Step,
        event: &str,
        version: u32,
    ) -> Result<(&EventType, &SchemaVersion), UpcastError> {
        self.types
            .get(event)
            .and_then(|t| Some((t, t.versions.get(&version)?)))
            .ok_or_else(|| UpcastError::NoSchema {
                step: step.describe(),
                event: event.to_owned(),
                version,
            })
    }

    /// A split or Rust step, which see and produce JSON: the outputs as Avro
    /// values of their target versions.
    fn upcast_as_json(
        &self,
        step: &Step,
        payload: Value,
    ) -> Result<Vec<(&EventType, u32, Value)>, UpcastError> {
        let input = avro_json::to_json(payload).map_err(|source| UpcastError::Input {
            step: step.describe(),
            source,
        })?;
        let outputs = step.apply(&input).map_err(|source| UpcastError::Step {
            step: step.describe(),
            source,
        })?;
        if outputs.len() > 64 {
            return Err(UpcastError::TooMany {
                step: step.describe(),
            });
        }
        outputs
            .into_iter()
            .map(|output| {
                let target = self.target_of(step, &output.event, output.version)?;
                let value = target.1.from_json.convert(&output.payload).map_err(|source| {
                    UpcastError::InvalidOutput {
                        step: step.describe(),
                        event: output.event.clone(),
                        version: output.version,
                        source,
                    }
                })?;
                Ok((target.0, output.version, value))
            })
            .collect()
    }
}

/// The precision of a decimal schema, also as an optional (`["null", decimal]`) one.
fn decimal_in(schema: &Schema) -> Option<usize> {
    match schema {
        Schema::Decimal(decimal) => Some(decimal.precision),
        Schema::Union(union) => union.variants().iter().find_map(decimal_in),
        _ => None,
    }
}

fn short_name(full: &str) -> &str {
    full.rsplit('.').next().unwrap_or(full)
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|entry| entry.path());
    for entry in entries {
        let path = entry.path();
        if path.is_dir() {
            collect_files(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

fn version_from_file_name(path: &Path) -> Option<u32> {
    let stem = path.file_stem()?.to_str()?;
    let (_, version) = stem.rsplit_once(".v")?;
    version.parse().ok()
}

#[cfg(test)]
mod tests;
