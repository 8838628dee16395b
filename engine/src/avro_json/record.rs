//! Building a record of a target schema from field values that are partly Avro
//! already (the fields an upcaster keeps) and partly JSON (what its expressions
//! computed): a kept value that already fits its field is taken as it is, so an
//! upcast event is not converted to JSON and back.

use apache_avro::schema::Name;
use apache_avro::types::Value;
use apache_avro::Schema;
use serde_json::Value as Json;
use std::collections::HashMap;

use super::{at, ConversionError, Converter, JsonToAvro, Path};

/// One field of a record being built.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue {
    /// A value decoded from the input event (logical types in their meaning).
    Avro(Value),
    /// A value an expression computed.
    Json(Json),
}

impl JsonToAvro {
    /// A record of the schema from named field values: each is converted to its
    /// field's type as [`JsonToAvro::convert`] converts JSON (an Avro value that
    /// already has exactly that type is taken unchanged), missing fields take their
    /// default, and a field the schema does not have is an error, as is a schema
    /// that is not a record.
    pub fn record(&self, fields: Vec<(String, FieldValue)>) -> Result<Value, ConversionError> {
        let converter = Converter { names: &self.names };
        let schema = match &self.schema {
            Schema::Ref { name } => self.names.get(name).unwrap_or(&self.schema),
            other => other,
        };
        let Schema::Record(record) = schema else {
            return Err(at(&Path::Event, "the target schema is not a record"));
        };
        let mut given: Vec<Option<FieldValue>> = vec![None; record.fields.len()];
        for (name, value) in fields {
            let Some(&index) = record.lookup.get(&name) else {
                return Err(at(
                    &Path::Field(&Path::Event, &name),
                    format!(
                        "not a field of {} (rename or drop it)",
                        record.name.fullname(None)
                    ),
                ));
            };
            given[index] = Some(value);
        }
        let mut out = Vec::with_capacity(record.fields.len());
        for (field, value) in record.fields.iter().zip(given) {
            let path = Path::Field(&Path::Event, &field.name);
            let value = match (value, &field.default) {
                (Some(FieldValue::Avro(value)), _) if fits(&value, &field.schema, &self.names) => value,
                (Some(FieldValue::Avro(value)), _) => {
                    let json = super::to_json(value).map_err(|e| at(&path, e.to_string()))?;
                    converter.convert(&json, &field.schema, &path)?
                }
                (Some(FieldValue::Json(json)), _) => converter.convert(&json, &field.schema, &path)?,
                (None, Some(default)) => converter.convert_default(default, &field.schema, &path)?,
                (None, None) => return Err(at(&path, "missing, and the field has no default")),
            };
            out.push((field.name.clone(), value));
        }
        Ok(Value::Record(out))
    }
}

/// Whether `value` is already exactly a value of `schema`, as converting its JSON
/// form would give it. Only the shapes a plain decoded value has are recognised;
/// anything else (a logical type in its meaning, a value a union must wrap) is
/// converted through JSON.
fn fits(value: &Value, schema: &Schema, names: &HashMap<Name, Schema>) -> bool {
    match (value, schema) {
        (value, Schema::Ref { name }) => names.get(name).is_some_and(|s| fits(value, s, names)),
        (Value::Null, Schema::Null)
        | (Value::Boolean(_), Schema::Boolean)
        | (Value::Int(_), Schema::Int)
        | (Value::Long(_), Schema::Long)
        | (Value::Float(_), Schema::Float)
        | (Value::Double(_), Schema::Double)
        | (Value::String(_), Schema::String)
        | (Value::TimestampMillis(_), Schema::TimestampMillis)
        | (Value::TimestampMicros(_), Schema::TimestampMicros)
        | (Value::TimestampNanos(_), Schema::TimestampNanos)
        | (Value::LocalTimestampMillis(_), Schema::LocalTimestampMillis)
        | (Value::LocalTimestampMicros(_), Schema::LocalTimestampMicros)
        | (Value::LocalTimestampNanos(_), Schema::LocalTimestampNanos) => true,
        (Value::Array(items), Schema::Array(array)) => {
            items.iter().all(|item| fits(item, &array.items, names))
        }
        (Value::Map(entries), Schema::Map(map)) => entries.values().all(|item| fits(item, &map.types, names)),
        (Value::Enum(index, symbol), Schema::Enum(enumeration)) => {
            enumeration.symbols.get(*index as usize) == Some(symbol)
        }
        (Value::Union(index, inner), Schema::Union(union)) => union
            .variants()
            .get(*index as usize)
            .is_some_and(|branch| fits(inner, branch, names)),
        (Value::Record(fields), Schema::Record(record)) => {
            fields.len() == record.fields.len()
                && fields
                    .iter()
                    .zip(&record.fields)
                    .all(|((name, value), field)| *name == field.name && fits(value, &field.schema, names))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn converter() -> JsonToAvro {
        JsonToAvro::new(
            &Schema::parse_str(
                r#"{"type": "record", "name": "E", "fields": [
                    {"name": "id", "type": "string"},
                    {"name": "n", "type": "long"},
                    {"name": "on", "type": {"type": "int", "logicalType": "date"}},
                    {"name": "note", "type": ["null", "string"], "default": null},
                    {"name": "lines", "type": {"type": "array", "items":
                        {"type": "record", "name": "L", "fields": [{"name": "q", "type": "int"}]}}},
                    {"name": "more", "type": {"type": "array", "items": "L"}, "default": []}
                ]}"#,
            )
            .unwrap(),
        )
        .unwrap()
    }

    fn line(q: i32) -> Value {
        Value::Record(vec![("q".into(), Value::Int(q))])
    }

    #[test]
    fn builds_the_same_record_as_converting_its_json() {
        let fields = vec![
            ("n".to_owned(), FieldValue::Json(json!(7))),
            ("id".to_owned(), FieldValue::Avro(Value::String("a".into()))),
            // A date in its meaning: not a `date` value, so through JSON.
            (
                "on".to_owned(),
                FieldValue::Avro(Value::String("2026-01-21".into())),
            ),
            // A long where an int is declared: converted (and range-checked).
            (
                "lines".to_owned(),
                FieldValue::Avro(Value::Array(vec![line(1), line(2)])),
            ),
            ("more".to_owned(), FieldValue::Avro(Value::Array(vec![line(3)]))),
        ];
        let built = converter().record(fields).unwrap();
        let via_json = converter()
            .convert(&json!({"n": 7, "id": "a", "on": "2026-01-21", "lines": [{"q": 1}, {"q": 2}], "more": [{"q": 3}]}))
            .unwrap();
        assert_eq!(built, via_json);
        let Value::Record(fields) = &built else { panic!() };
        assert_eq!(fields[2].1, Value::Date(20474));
        assert_eq!(fields[3].1, Value::Union(0, Box::new(Value::Null)));
    }

    #[test]
    fn a_value_of_another_type_is_converted_or_refused_naming_the_field() {
        let c = converter();
        let base = || {
            vec![
                ("id".to_owned(), FieldValue::Avro(Value::String("a".into()))),
                ("on".to_owned(), FieldValue::Json(json!(1))),
                ("lines".to_owned(), FieldValue::Json(json!([]))),
            ]
        };
        let mut widened = base();
        widened.push(("n".to_owned(), FieldValue::Avro(Value::Int(5))));
        let Value::Record(fields) = c.record(widened).unwrap() else {
            panic!()
        };
        assert_eq!(fields[1].1, Value::Long(5));

        let mut wrong = base();
        wrong.push(("n".to_owned(), FieldValue::Avro(Value::String("x".into()))));
        let error = c.record(wrong).unwrap_err().to_string();
        assert!(error.starts_with("event.n: "), "{error}");

        let mut extra = base();
        extra.push(("n".to_owned(), FieldValue::Json(json!(1))));
        extra.push(("colour".to_owned(), FieldValue::Json(json!("red"))));
        let error = c.record(extra).unwrap_err().to_string();
        assert!(error.contains("event.colour: not a field of E"), "{error}");

        let error = c.record(base()).unwrap_err().to_string();
        assert!(error.contains("event.n: missing"), "{error}");

        let mut long_line = base();
        long_line[2] = (
            "lines".to_owned(),
            FieldValue::Avro(Value::Array(vec![Value::Record(vec![(
                "q".into(),
                Value::Long(1 << 40),
            )])])),
        );
        long_line.push(("n".to_owned(), FieldValue::Json(json!(1))));
        let error = c.record(long_line).unwrap_err().to_string();
        assert!(error.contains("event.lines[0].q"), "{error}");
    }
}
