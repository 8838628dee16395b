//! Between Avro values and JSON: upcasters and expressions work on JSON; what they
//! produce is converted back under the target schema, field by field, with errors
//! that name the field.

use std::collections::HashMap;

use apache_avro::schema::{Name, ResolvedSchema};
use apache_avro::types::Value;
use apache_avro::Schema;
use serde_json::{Map, Value as Json};

use crate::logical;

mod record;
pub use record::FieldValue;

/// Why a value could not be converted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConversionError {
    /// An Avro value has no JSON form (a float that is NaN or infinite).
    #[error("not representable as JSON: {0}")]
    NotJson(String),
    /// The schema's named types do not resolve.
    #[error("the schema's named types do not resolve: {0}")]
    Schema(String),
    /// A JSON value does not fit the schema at `path` (`event.items[2].sku`).
    #[error("{path}: {message}")]
    Mismatch {
        /// Where in the event.
        path: String,
        /// What is wrong.
        message: String,
    },
}

fn at(path: &Path<'_>, message: impl Into<String>) -> ConversionError {
    ConversionError::Mismatch {
        path: path.to_string(),
        message: message.into(),
    }
}

/// An Avro value as JSON: records and maps become objects, unions their branch,
/// enums their symbol, timestamps their number.
pub fn to_json(value: Value) -> Result<Json, ConversionError> {
    Json::try_from(value).map_err(|e| ConversionError::NotJson(e.to_string()))
}

/// A JSON value as an Avro value of `schema`. Missing record fields take their
/// default; fields the schema does not have are an error, as are numbers out of
/// range.
#[cfg(test)]
pub fn from_json(json: &Json, schema: &Schema) -> Result<Value, ConversionError> {
    JsonToAvro::new(schema)?.convert(json)
}

/// [`from_json`] for one schema, its named types resolved once rather than per
/// value (upcasting converts every upcast event).
#[derive(Debug, Clone)]
pub struct JsonToAvro {
    schema: Schema,
    names: HashMap<Name, Schema>,
}

impl JsonToAvro {
    /// A converter to values of `schema`.
    pub fn new(schema: &Schema) -> Result<Self, ConversionError> {
        let resolved =
            ResolvedSchema::try_from(schema).map_err(|e| ConversionError::Schema(e.to_string()))?;
        let names = resolved
            .get_names()
            .iter()
            .map(|(name, named)| (name.clone(), (*named).clone()))
            .collect();
        Ok(JsonToAvro {
            schema: schema.clone(),
            names,
        })
    }

    /// `json` as an Avro value of the schema, as [`from_json`] does.
    pub fn convert(&self, json: &Json) -> Result<Value, ConversionError> {
        Converter { names: &self.names }.convert(json, &self.schema, &Path::Event)
    }
}

/// Where a value sits in the event (`event.items[2].sku`), for error messages:
/// formatted only when an error needs it.
enum Path<'a> {
    Event,
    Field(&'a Path<'a>, &'a str),
    Index(&'a Path<'a>, usize),
}

impl std::fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Path::Event => f.write_str("event"),
            Path::Field(parent, name) => write!(f, "{parent}.{name}"),
            Path::Index(parent, index) => write!(f, "{parent}[{index}]"),
        }
    }
}

struct Converter<'s> {
    names: &'s HashMap<Name, Schema>,
}

impl Converter<'_> {
    fn convert(&self, json: &Json, schema: &Schema, path: &Path<'_>) -> Result<Value, ConversionError> {
        let mismatch = || at(path, format!("{json} is not a valid {}", kind(schema)));
        let integer = || json.as_i64().ok_or_else(mismatch);
        Ok(match schema {
            Schema::Null => json.is_null().then_some(Value::Null).ok_or_else(mismatch)?,
            Schema::Boolean => Value::Boolean(json.as_bool().ok_or_else(mismatch)?),
            Schema::Int => Value::Int(i32::try_from(integer()?).map_err(|_| mismatch())?),
            Schema::Long => Value::Long(integer()?),
            Schema::Float => Value::Float(json.as_f64().ok_or_else(mismatch)? as f32),
            Schema::Double => Value::Double(json.as_f64().ok_or_else(mismatch)?),
            Schema::String => Value::String(json.as_str().ok_or_else(mismatch)?.to_owned()),
            Schema::Uuid => Value::String(json.as_str().ok_or_else(mismatch)?.to_owned())
                .resolve(schema)
                .map_err(|e| at(path, e.to_string()))?,
            Schema::Bytes => Value::Bytes(bytes(json).ok_or_else(mismatch)?),
            Schema::Fixed(fixed) => {
                let bytes = bytes(json)
                    .filter(|b| b.len() == fixed.size)
                    .ok_or_else(mismatch)?;
                Value::Fixed(fixed.size, bytes)
            }
            Schema::Date => match json.as_str() {
                Some(text) => Value::Date(logical::date_from_text(text).ok_or_else(mismatch)?),
                None => Value::Date(i32::try_from(integer()?).map_err(|_| mismatch())?),
            },
            Schema::TimeMillis => match json.as_str() {
                Some(text) => Value::TimeMillis(
                    logical::time_from_text(text)
                        .filter(|micros| micros % 1_000 == 0)
                        .and_then(|micros| i32::try_from(micros / 1_000).ok())
                        .ok_or_else(mismatch)?,
                ),
                None => Value::TimeMillis(i32::try_from(integer()?).map_err(|_| mismatch())?),
            },
            Schema::TimeMicros => match json.as_str() {
                Some(text) => Value::TimeMicros(logical::time_from_text(text).ok_or_else(mismatch)?),
                None => Value::TimeMicros(integer()?),
            },
            Schema::TimestampMillis => Value::TimestampMillis(integer()?),
            Schema::TimestampMicros => Value::TimestampMicros(integer()?),
            Schema::TimestampNanos => Value::TimestampNanos(integer()?),
            Schema::LocalTimestampMillis => Value::LocalTimestampMillis(integer()?),
            Schema::LocalTimestampMicros => Value::LocalTimestampMicros(integer()?),
            Schema::LocalTimestampNanos => Value::LocalTimestampNanos(integer()?),
            Schema::Array(array) => Value::Array(
                json.as_array()
                    .ok_or_else(mismatch)?
                    .iter()
                    .enumerate()
                    .map(|(i, item)| self.convert(item, &array.items, &Path::Index(path, i)))
                    .collect::<Result<_, _>>()?,
            ),
            Schema::Map(map) => Value::Map(
                json.as_object()
                    .ok_or_else(mismatch)?
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), self.convert(v, &map.types, &Path::Field(path, k))?)))
                    .collect::<Result<_, ConversionError>>()?,
            ),
            Schema::Enum(enumeration) => {
                let symbol = json.as_str().ok_or_else(mismatch)?;
                let index = enumeration
                    .symbols
                    .iter()
                    .position(|s| s == symbol)
                    .ok_or_else(mismatch)?;
                Value::Enum(index as u32, symbol.to_owned())
            }
            Schema::Union(union) => {
                // The usual optional field: take the null branch without trying
                // (and formatting the failures of) the others.
                let null = union.variants().iter().position(|b| matches!(b, Schema::Null));
                match (json.is_null(), null) {
                    (true, Some(index)) => return Ok(Value::Union(index as u32, Box::new(Value::Null))),
                    (false, Some(null_index)) if union.variants().len() == 2 => {
                        let index = 1 - null_index;
                        let value = self.convert(json, &union.variants()[index], path)?;
                        return Ok(Value::Union(index as u32, Box::new(value)));
                    }
                    _ => {}
                }
                let mut errors = Vec::new();
                for (index, branch) in union.variants().iter().enumerate() {
                    match self.convert(json, branch, path) {
                        Ok(value) => return Ok(Value::Union(index as u32, Box::new(value))),
                        Err(e) => errors.push(e.to_string()),
                    }
                }
                return Err(at(
                    path,
                    format!("{json} matches no branch of the union ({})", errors.join("; ")),
                ));
            }
            Schema::Record(record) => {
                let object = json.as_object().ok_or_else(mismatch)?;
                if let Some(extra) = object.keys().find(|k| !record.lookup.contains_key(*k)) {
                    return Err(at(
                        &Path::Field(path, extra),
                        format!(
                            "not a field of {} (rename or drop it)",
                            record.name.fullname(None)
                        ),
                    ));
                }
                let mut fields = Vec::with_capacity(record.fields.len());
                for field in &record.fields {
                    let field_path = Path::Field(path, &field.name);
                    let value = match (object.get(&field.name), &field.default) {
                        (Some(value), _) => self.convert(value, &field.schema, &field_path)?,
                        (None, Some(default)) => self.convert_default(default, &field.schema, &field_path)?,
                        (None, None) => return Err(at(&field_path, "missing, and the field has no default")),
                    };
                    fields.push((field.name.clone(), value));
                }
                Value::Record(fields)
            }
            Schema::Ref { name } => {
                let target = self
                    .names
                    .get(name)
                    .ok_or_else(|| at(path, format!("unknown named type {}", name.fullname(None))))?;
                self.convert(json, target, path)?
            }
            Schema::Decimal(decimal) => {
                let exact = decimal_of(json).ok_or_else(mismatch)?;
                let unscaled = logical::unscaled_at(&exact, decimal.precision, decimal.scale)
                    .map_err(|e| at(path, e))?;
                Value::Decimal(apache_avro::Decimal::from(unscaled.to_signed_bytes_be()))
            }
            Schema::BigDecimal => Value::BigDecimal(decimal_of(json).ok_or_else(mismatch)?),
            Schema::Duration => {
                return Err(at(
                    path,
                    format!("{} values cannot be built by an upcaster", kind(schema)),
                ))
            }
        })
    }

    /// Avro defaults of union fields are of the union's first branch.
    fn convert_default(
        &self,
        default: &Json,
        schema: &Schema,
        path: &Path<'_>,
    ) -> Result<Value, ConversionError> {
        match schema {
            Schema::Union(union) if !union.variants().is_empty() => Ok(Value::Union(
                0,
                Box::new(self.convert(default, &union.variants()[0], path)?),
            )),
            _ => self.convert(default, schema, path),
        }
    }
}

/// Bytes from their JSON form: a base64 string (as [`logical::Plain`] writes
/// them), or an array of byte values.
fn bytes(json: &Json) -> Option<Vec<u8>> {
    match json {
        Json::String(text) => logical::bytes_from_base64(text),
        Json::Array(items) => items
            .iter()
            .map(|i| i.as_u64().and_then(|b| u8::try_from(b).ok()))
            .collect(),
        _ => None,
    }
}

/// An exact decimal from a decimal string or an integer (never a float).
fn decimal_of(json: &Json) -> Option<bigdecimal::BigDecimal> {
    match json {
        Json::String(text) => logical::decimal_from_text(text),
        Json::Number(n) if n.is_i64() || n.is_u64() => logical::decimal_from_text(&n.to_string()),
        _ => None,
    }
}

fn kind(schema: &Schema) -> String {
    match schema {
        Schema::Record(record) => format!("record {}", record.name.fullname(None)),
        Schema::Ref { name } => name.fullname(None),
        other => format!("{:?}", apache_avro::schema::SchemaKind::from(other)).to_lowercase(),
    }
}

/// A value of `schema` with every field present, as an upcaster sees it (logical
/// types in their meaning, see [`logical`]), for checking upcasters without data:
/// strings `"sample"`, numbers 1, one element per array and map.
pub fn sample(schema: &Schema) -> Json {
    let names = ResolvedSchema::try_from(schema)
        .map(|r| {
            r.get_names()
                .iter()
                .map(|(k, v)| (k.clone(), (*v).clone()))
                .collect()
        })
        .unwrap_or_default();
    sample_with(schema, &names, 0)
}

fn sample_with(schema: &Schema, names: &HashMap<Name, Schema>, depth: usize) -> Json {
    if depth > 16 {
        return Json::Null;
    }
    match schema {
        Schema::Null => Json::Null,
        Schema::Boolean => Json::Bool(true),
        Schema::Float | Schema::Double => serde_json::json!(1.5),
        Schema::String => Json::String("sample".into()),
        Schema::Uuid => Json::String("00000000-0000-0000-0000-000000000001".into()),
        Schema::Bytes => Json::String("c2FtcGxl".into()),
        Schema::Fixed(fixed) => Json::String(base64_zeros(fixed.size)),
        Schema::Decimal(decimal) => Json::String(match decimal.scale {
            0 => "1".to_owned(),
            scale => format!("1.{}", "0".repeat(scale)),
        }),
        Schema::BigDecimal => Json::String("1".into()),
        Schema::Date => Json::String("1970-01-02".into()),
        Schema::TimeMillis => Json::String("00:00:01.000".into()),
        Schema::TimeMicros => Json::String("00:00:01.000000".into()),
        Schema::Array(array) => Json::Array(vec![sample_with(&array.items, names, depth + 1)]),
        Schema::Map(map) => {
            let mut object = Map::new();
            object.insert("key".into(), sample_with(&map.types, names, depth + 1));
            Json::Object(object)
        }
        Schema::Enum(enumeration) => Json::String(enumeration.symbols.first().cloned().unwrap_or_default()),
        Schema::Union(union) => union
            .variants()
            .iter()
            .find(|v| !matches!(v, Schema::Null))
            .map(|v| sample_with(v, names, depth + 1))
            .unwrap_or(Json::Null),
        Schema::Record(record) => Json::Object(
            record
                .fields
                .iter()
                .map(|f| (f.name.clone(), sample_with(&f.schema, names, depth + 1)))
                .collect(),
        ),
        Schema::Ref { name } => names
            .get(name)
            .map(|s| sample_with(s, names, depth + 1))
            .unwrap_or(Json::Null),
        _ => Json::from(1),
    }
}

fn base64_zeros(size: usize) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(vec![0u8; size])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Schema {
        Schema::parse_str(
            r#"{"type":"record","name":"E","namespace":"t","fields":[
                {"name":"id","type":"string"},
                {"name":"n","type":"int"},
                {"name":"at","type":{"type":"long","logicalType":"timestamp-millis"}},
                {"name":"tags","type":{"type":"array","items":"string"}},
                {"name":"note","type":["null","string"],"default":null},
                {"name":"inner","type":{"type":"record","name":"I","fields":[{"name":"x","type":"double"}]}},
                {"name":"again","type":["null","I"],"default":null}
            ]}"#,
        )
        .unwrap()
    }

    #[test]
    fn round_trips_and_fills_defaults() {
        let schema = schema();
        let json =
            json!({"id": "a", "n": 3, "at": 5, "tags": ["x"], "inner": {"x": 1.5}, "again": {"x": 2.0}});
        let value = from_json(&json, &schema).unwrap();
        assert!(value.validate(&schema));
        let mut back = to_json(value).unwrap();
        assert_eq!(back["note"], Json::Null, "default filled");
        back.as_object_mut().unwrap().remove("note");
        assert_eq!(back, json);
    }

    #[test]
    fn errors_name_the_field() {
        let schema = schema();
        let base = json!({"id": "a", "n": 3, "at": 5, "tags": [], "inner": {"x": 1.0}});
        let path = |json: &Json| match from_json(json, &schema).unwrap_err() {
            ConversionError::Mismatch { path, message } => (path, message),
            other => panic!("a mismatch, got {other}"),
        };
        let mut too_big = base.clone();
        too_big["n"] = json!(1u64 << 40);
        assert_eq!(path(&too_big).0, "event.n");
        let mut extra = base.clone();
        extra["surprise"] = json!(1);
        assert_eq!(path(&extra).0, "event.surprise");
        let mut missing = base.clone();
        missing.as_object_mut().unwrap().remove("id");
        assert_eq!(
            path(&missing),
            (
                "event.id".to_owned(),
                "missing, and the field has no default".to_owned()
            )
        );
        let mut wrong = base;
        wrong["tags"] = json!([1]);
        assert_eq!(path(&wrong).0, "event.tags[0]");
    }

    #[test]
    fn samples_are_valid_values_of_their_schema() {
        let schema = schema();
        let value = from_json(&sample(&schema), &schema).unwrap();
        assert!(value.validate(&schema));
    }
}

#[cfg(test)]
mod logical_tests;
