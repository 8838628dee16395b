//! Upcaster steps: how an event of one version becomes the next.
//!
//! Declared next to the schemas, in `<Name>.upcast.toml`:
//!
//! ```toml
//! # OrderPlaced v1 -> v2: amounts move from currency units to cents.
//! [[step]]
//! from = 1                       # the version this step reads
//! # to_event = "shop.orders.X"   # the type it produces (default: the same type)
//! # to_version = 2               # default: from + 1 (required with to_event)
//! rename = { oldName = "newName" }
//! set = { totalCents = "int(math.round(event.total * 100.0))", currency = "'EUR'" }
//! drop = ["total"]
//! # drop_event_if = "event.total < 0.0"   # CEL guard: the event disappears
//! # split = [{ event = "shop.orders.A", version = 1, set = { ... } }, ...]
//! # rust = "name"                          # a Rust upcaster registered by name
//! ```
//!
//! Expressions (CEL) see `event`, the step's input. A transform applies `rename`,
//! then `set`, then `drop`; `split` builds each output from its own `set` only;
//! `rust` hands the input to a function. Whatever a step produces must be valid
//! under the target version's schema (checked at start-up on a generated sample,
//! and on every event).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use apache_avro::types::Value;
use serde::Deserialize;
use serde_json::{Map, Value as Json};

use crate::avro_json::FieldValue;

use crate::expr::{Expr, ExprError, Scope};

/// One event an upcaster produced.
#[derive(Debug, Clone, PartialEq)]
pub struct UpcastOutput {
    /// Full name of the produced event's type.
    pub event: String,
    /// Its version.
    pub version: u32,
    /// Its payload, as JSON.
    pub payload: Json,
}

/// Why an event could not be brought to its current version; it goes to the
/// poison policy as `upcast_failed`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpcastError {
    /// A version with neither an upcaster nor the newest version's schema.
    #[error("{event} v{version} has no upcaster")]
    NoPath {
        /// The event type.
        event: String,
        /// Its version.
        version: u32,
    },
    /// A logical-type value of the event has no meaningful form.
    #[error("{event} v{version}: {source}")]
    Logical {
        /// The event type.
        event: String,
        /// Its version.
        version: u32,
        /// Which value, and why.
        source: crate::logical::LogicalError,
    },
    /// The step's input has no JSON form.
    #[error("{step}: {source}")]
    Input {
        /// The step.
        step: String,
        /// Why.
        source: crate::avro_json::ConversionError,
    },
    /// The step itself failed.
    #[error("{step}: {source}")]
    Step {
        /// The step.
        step: String,
        /// Why.
        source: StepError,
    },
    /// The step split an event into too many.
    #[error("{step}: upcasting produced more than 64 events")]
    TooMany {
        /// The step.
        step: String,
    },
    /// The step produced a type or version that has no schema.
    #[error("{step}: produced {event} v{version}, which has no schema")]
    NoSchema {
        /// The step.
        step: String,
        /// The event type produced.
        event: String,
        /// Its version.
        version: u32,
    },
    /// The step's output does not fit its target schema.
    #[error("{step}: output is not a valid {event} v{version}: {source}")]
    InvalidOutput {
        /// The step.
        step: String,
        /// The event type produced.
        event: String,
        /// Its version.
        version: u32,
        /// Where it does not fit.
        source: crate::avro_json::ConversionError,
    },
}

/// Why a step could not upcast its input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// An expression of the step failed.
    #[error(transparent)]
    Expr(#[from] ExprError),
    /// The input is not a record.
    #[error("the input is {0}, not a record")]
    NotARecord(String),
    /// A field to rename is not there.
    #[error("rename: the input has no field `{0}`")]
    NoField(String),
    /// A Rust upcaster refused the input.
    #[error("Rust upcaster `{name}`: {message}")]
    Rust {
        /// The upcaster's name.
        name: String,
        /// What it said.
        message: String,
    },
}

/// An upcaster written in Rust: the input payload to zero or more outputs.
pub type RustUpcaster = fn(&Json) -> Result<Vec<UpcastOutput>, String>;

/// Rust upcasters by the name upcast files use for them.
pub type RustUpcasters = BTreeMap<&'static str, RustUpcaster>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StepFile {
    #[serde(default)]
    step: Vec<StepSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StepSpec {
    from: u32,
    to_event: Option<String>,
    to_version: Option<u32>,
    #[serde(default)]
    rename: BTreeMap<String, String>,
    #[serde(default)]
    set: BTreeMap<String, String>,
    #[serde(default)]
    drop: Vec<String>,
    drop_event_if: Option<String>,
    #[serde(default)]
    split: Vec<SplitSpec>,
    rust: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SplitSpec {
    event: String,
    version: u32,
    #[serde(default)]
    set: BTreeMap<String, String>,
}

/// A compiled step.
#[derive(Debug)]
pub struct Step {
    /// The version it reads.
    pub from: u32,
    /// The file that declares it.
    pub file: PathBuf,
    /// 1-based position in the file, for messages.
    pub index: usize,
    drop_event_if: Option<Expr>,
    kind: StepKind,
    /// The fields of `event` the step's expressions read (`None`: all of it), bound
    /// once per event for all of them.
    event_fields: Option<Vec<String>>,
}

/// One output of a split: event type, version, and its fields' expressions.
type SplitOutput = (String, u32, Vec<(String, Expr)>);

#[derive(Debug)]
enum StepKind {
    Transform {
        to_event: String,
        to_version: u32,
        rename: BTreeMap<String, String>,
        set: Vec<(String, Expr)>,
        drop: Vec<String>,
    },
    Split(Vec<SplitOutput>),
    Rust {
        name: String,
        upcaster: RustUpcaster,
    },
}

impl Step {
    /// `file: step N (from vX)`, for messages.
    pub fn describe(&self) -> String {
        format!(
            "{}: step {} (from v{})",
            self.file.display(),
            self.index,
            self.from
        )
    }

    /// The (type, version) pairs this step can produce; empty for Rust steps, whose
    /// outputs are only known by running them.
    pub fn declared_targets(&self) -> Vec<(String, u32)> {
        match &self.kind {
            StepKind::Transform {
                to_event, to_version, ..
            } => vec![(to_event.clone(), *to_version)],
            StepKind::Split(outputs) => outputs.iter().map(|(e, v, _)| (e.clone(), *v)).collect(),
            StepKind::Rust { .. } => Vec::new(),
        }
    }

    /// Runs the step on one payload.
    pub fn apply(&self, input: &Json) -> Result<Vec<UpcastOutput>, StepError> {
        let mut scope = Scope::default();
        if !matches!(self.kind, StepKind::Rust { .. }) {
            scope.bind_json_fields("event", input, self.event_fields.as_deref());
        }
        if let Some(guard) = &self.drop_event_if {
            if guard.test_in(&scope)? {
                return Ok(Vec::new());
            }
        }
        match &self.kind {
            StepKind::Transform {
                to_event,
                to_version,
                rename,
                set,
                drop,
            } => {
                let Json::Object(fields) = input else {
                    return Err(StepError::NotARecord(input.to_string()));
                };
                let mut output: Map<String, Json> = fields.clone();
                for (old, new) in rename {
                    let value = output
                        .remove(old)
                        .ok_or_else(|| StepError::NoField(old.clone()))?;
                    output.insert(new.clone(), value);
                }
                for (field, expr) in set {
                    output.insert(field.clone(), expr.value_in(&scope)?);
                }
                for field in drop {
                    output.remove(field);
                }
                Ok(vec![UpcastOutput {
                    event: to_event.clone(),
                    version: *to_version,
                    payload: Json::Object(output),
                }])
            }
            StepKind::Split(outputs) => outputs
                .iter()
                .map(|(event, version, set)| {
                    let payload = set
                        .iter()
                        .map(|(field, expr)| Ok((field.clone(), expr.value_in(&scope)?)))
                        .collect::<Result<Map<_, _>, StepError>>()?;
                    Ok(UpcastOutput {
                        event: event.clone(),
                        version: *version,
                        payload: Json::Object(payload),
                    })
                })
                .collect(),
            StepKind::Rust { name, upcaster } => upcaster(input).map_err(|message| StepError::Rust {
                name: name.clone(),
                message,
            }),
        }
    }
}

/// A transform step (rename, set, drop), which can work on the decoded record
/// itself: see [`Step::as_transform`].
pub struct TransformStep<'a> {
    step: &'a Step,
    /// The type it produces.
    pub to_event: &'a str,
    /// The version it produces.
    pub to_version: u32,
    rename: &'a BTreeMap<String, String>,
    set: &'a [(String, Expr)],
    drop: &'a [String],
}

impl Step {
    /// This step as a transform, or `None` for a split or a Rust step (which work
    /// on JSON, see [`Step::apply`]).
    pub fn as_transform(&self) -> Option<TransformStep<'_>> {
        match &self.kind {
            StepKind::Transform {
                to_event,
                to_version,
                rename,
                set,
                drop,
            } => Some(TransformStep {
                step: self,
                to_event,
                to_version: *to_version,
                rename,
                set,
                drop,
            }),
            StepKind::Split(_) | StepKind::Rust { .. } => None,
        }
    }
}

impl TransformStep<'_> {
    /// [`Step::apply`] on a decoded record (logical types in their meaning)
    /// without a detour through JSON: the fields it keeps stay Avro values and the
    /// expressions see only the fields they read. `None` when `drop_event_if`
    /// dropped the event, else the output's fields, to be built into a record of
    /// the target version ([`crate::avro_json::JsonToAvro::record`]).
    pub fn apply(&self, input: Value) -> Result<Option<Vec<(String, FieldValue)>>, StepError> {
        let mut scope = Scope::default();
        scope.bind_avro_fields("event", &input, self.step.event_fields.as_deref());
        if let Some(guard) = &self.step.drop_event_if {
            if guard.test_in(&scope)? {
                return Ok(None);
            }
        }
        let computed = self
            .set
            .iter()
            .map(|(field, expr)| Ok((field, expr.value_in(&scope)?)))
            .collect::<Result<Vec<_>, StepError>>()?;
        drop(scope);
        let Value::Record(fields) = input else {
            return Err(StepError::NotARecord(format!("{input:?}")));
        };
        let mut output: Vec<(String, FieldValue)> = fields
            .into_iter()
            .map(|(name, value)| (name, FieldValue::Avro(value)))
            .collect();
        let put = |output: &mut Vec<(String, FieldValue)>, name: &str, value: FieldValue| match output
            .iter_mut()
            .find(|(field, _)| field == name)
        {
            Some(slot) => slot.1 = value,
            None => output.push((name.to_owned(), value)),
        };
        for (old, new) in self.rename {
            let position = output
                .iter()
                .position(|(field, _)| field == old)
                .ok_or_else(|| StepError::NoField(old.clone()))?;
            let (_, value) = output.remove(position);
            put(&mut output, new, value);
        }
        for (field, value) in computed {
            put(&mut output, field, FieldValue::Json(value));
        }
        output.retain(|(field, _)| !self.drop.contains(field));
        Ok(Some(output))
    }
}

/// Reads the steps of `event` from `file`.
pub fn load_steps(file: &Path, event: &str, rust: &RustUpcasters) -> Result<Vec<Step>, String> {
    let text = std::fs::read_to_string(file).map_err(|e| e.to_string())?;
    let parsed: StepFile = toml::from_str(&text).map_err(|e| e.to_string())?;
    parsed
        .step
        .into_iter()
        .enumerate()
        .map(|(position, spec)| {
            let index = position + 1;
            compile_step(file, event, index, spec).map_err(|e| format!("step {index}: {e}"))
        })
        .map(|step| step.and_then(|s| resolve_rust(s, rust)))
        .collect()
}

fn compile_step(file: &Path, event: &str, index: usize, spec: StepSpec) -> Result<Step, String> {
    let compile_set = |set: &BTreeMap<String, String>| -> Result<Vec<(String, Expr)>, String> {
        set.iter()
            .map(|(field, source)| {
                Expr::compile(source)
                    .map(|e| (field.clone(), e))
                    .map_err(|e| format!("set.{field}: {e}"))
            })
            .collect()
    };
    let drop_event_if = spec
        .drop_event_if
        .as_deref()
        .map(Expr::compile)
        .transpose()
        .map_err(|e| format!("drop_event_if: {e}"))?;
    let transforms = !spec.rename.is_empty() || !spec.set.is_empty() || !spec.drop.is_empty();
    let kind = match (spec.rust, spec.split.is_empty()) {
        (Some(name), true) if !transforms && spec.to_event.is_none() => StepKind::Rust {
            name,
            upcaster: |_| Err("not resolved".to_owned()),
        },
        (Some(_), _) => return Err("`rust` cannot be combined with rename/set/drop/split/to_event".into()),
        (None, false) if !transforms && spec.to_event.is_none() && spec.to_version.is_none() => {
            StepKind::Split(
                spec.split
                    .iter()
                    .map(|s| Ok((s.event.clone(), s.version, compile_set(&s.set)?)))
                    .collect::<Result<_, String>>()?,
            )
        }
        (None, false) => {
            return Err("`split` cannot be combined with rename/set/drop/to_event/to_version".into())
        }
        (None, true) => {
            let to_event = spec.to_event.clone().unwrap_or_else(|| event.to_owned());
            let to_version = match (spec.to_version, to_event == event) {
                (Some(v), _) => v,
                (None, true) => spec.from + 1,
                (None, false) => return Err("`to_version` is required with `to_event`".into()),
            };
            if to_event == event && to_version <= spec.from {
                return Err(format!(
                    "goes from v{} to v{to_version}: a step must move to a newer version",
                    spec.from
                ));
            }
            StepKind::Transform {
                to_event,
                to_version,
                rename: spec.rename,
                set: compile_set(&spec.set)?,
                drop: spec.drop,
            }
        }
    };
    let expressions: Vec<&Expr> = match &kind {
        StepKind::Transform { set, .. } => set.iter().map(|(_, e)| e).collect(),
        StepKind::Split(outputs) => outputs
            .iter()
            .flat_map(|(_, _, set)| set.iter().map(|(_, e)| e))
            .collect(),
        StepKind::Rust { .. } => Vec::new(),
    };
    let event_fields = expressions
        .into_iter()
        .chain(drop_event_if.as_ref())
        .map(|e| e.fields_read("event"))
        .collect::<Option<Vec<Vec<String>>>>()
        .map(|lists| lists.concat());
    Ok(Step {
        from: spec.from,
        file: file.to_owned(),
        index,
        drop_event_if,
        kind,
        event_fields,
    })
}

fn resolve_rust(mut step: Step, rust: &RustUpcasters) -> Result<Step, String> {
    if let StepKind::Rust { name, upcaster } = &mut step.kind {
        *upcaster = *rust.get(name.as_str()).ok_or_else(|| {
            let known: Vec<&str> = rust.keys().copied().collect();
            format!(
                "step {}: no Rust upcaster named `{name}` (registered: {})",
                step.index,
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            )
        })?;
    }
    Ok(step)
}

#[cfg(test)]
mod tests;
