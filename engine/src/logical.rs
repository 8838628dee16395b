//! Avro logical types with their meaning, both ways.
//!
//! A decoded Avro value carries a logical type as its encoding: a `decimal(12,2)`
//! of 12.34 is the bytes `[4, 210]`, a `date` the day number 20479. Projections,
//! CEL and readers see the meaning instead ([`Plain`] converts, once per event,
//! only when the schema has such a type):
//!
//! | Avro | as seen by projections, CEL, HTTP |
//! | --- | --- |
//! | `decimal(p,s)`, `big-decimal` | string with exactly `s` digits after the point: `"1234.50"` |
//! | `date` | ISO date string: `"2026-01-21"` |
//! | `time-millis` / `time-micros` | ISO time string: `"13:45:00.250"` / `"13:45:00.250000"` |
//! | `uuid` | string |
//! | `bytes`, `fixed` | base64 string (standard alphabet, padded) |
//! | `timestamp-*`, `local-timestamp-*` | number in its unit, unchanged |
//!
//! The other way (an upcaster's JSON into an Avro value) uses the parsers here
//! ([`decimal_from_text`], [`date_from_text`], ...); their tests, both ways, are
//! with that conversion (`avro_json/logical_tests.rs`).

use std::collections::{HashMap, HashSet};
use std::str::FromStr;

use apache_avro::schema::{DecimalSchema, Name};
use apache_avro::types::Value;
use apache_avro::Schema;
use base64::Engine as _;
use bigdecimal::num_bigint::BigInt;
use bigdecimal::BigDecimal;

/// A logical value that has no meaningful form (a day or time out of range).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct LogicalError {
    /// Where in the event (`event.paidOn`).
    pub path: String,
    /// What is wrong.
    pub message: String,
}

/// Converts the logical-type values of one schema to their meaning.
#[derive(Debug, Clone)]
pub struct Plain {
    schema: Schema,
    names: HashMap<Name, Schema>,
}

impl Plain {
    /// The converter for values of `schema` (named types also looked up in
    /// `schemata`), or `None` when the schema has no logical type to convert.
    pub fn for_schema(schema: &Schema, schemata: &[Schema]) -> Option<Plain> {
        let mut names = HashMap::new();
        for named in schemata.iter().chain([schema]) {
            collect_names(named, &mut names);
        }
        has_logical(schema, &names, &mut HashSet::new()).then(|| Plain {
            schema: schema.clone(),
            names,
        })
    }

    /// `value` (of the schema) with every logical value replaced by its meaning.
    pub fn convert(&self, value: Value) -> Result<Value, LogicalError> {
        self.walk(value, &self.schema, &mut String::from("event"))
    }

    fn walk(&self, value: Value, schema: &Schema, path: &mut String) -> Result<Value, LogicalError> {
        let schema = match schema {
            Schema::Ref { name } => self.names.get(name).unwrap_or(schema),
            other => other,
        };
        Ok(match (value, schema) {
            (Value::Record(fields), Schema::Record(record)) => {
                let mut out = Vec::with_capacity(fields.len());
                for (name, value) in fields {
                    let Some(field) = record.lookup.get(&name).map(|i| &record.fields[*i]) else {
                        out.push((name, value));
                        continue;
                    };
                    let len = path.len();
                    path.push('.');
                    path.push_str(&name);
                    let value = self.walk(value, &field.schema, path)?;
                    path.truncate(len);
                    out.push((name, value));
                }
                Value::Record(out)
            }
            (Value::Array(items), Schema::Array(array)) => {
                let mut out = Vec::with_capacity(items.len());
                for (index, item) in items.into_iter().enumerate() {
                    let len = path.len();
                    path.push_str(&format!("[{index}]"));
                    out.push(self.walk(item, &array.items, path)?);
                    path.truncate(len);
                }
                Value::Array(out)
            }
            (Value::Map(entries), Schema::Map(map)) => {
                let mut out = HashMap::with_capacity(entries.len());
                for (key, item) in entries {
                    let len = path.len();
                    path.push('.');
                    path.push_str(&key);
                    let item = self.walk(item, &map.types, path)?;
                    path.truncate(len);
                    out.insert(key, item);
                }
                Value::Map(out)
            }
            (Value::Union(index, inner), Schema::Union(union)) => {
                match union.variants().get(index as usize) {
                    Some(branch) => Value::Union(index, Box::new(self.walk(*inner, branch, path)?)),
                    None => Value::Union(index, inner),
                }
            }
            (Value::Decimal(decimal), Schema::Decimal(DecimalSchema { scale, .. })) => {
                let unscaled = BigInt::from(decimal);
                Value::String(decimal_text(&BigDecimal::new(unscaled, scale_i64(*scale))))
            }
            (Value::BigDecimal(decimal), _) => Value::String(decimal_text(&decimal)),
            (Value::Date(days), _) => Value::String(date_text(days).ok_or_else(|| LogicalError {
                path: path.clone(),
                message: format!("day {days} is not a date chrono can represent"),
            })?),
            (Value::TimeMillis(millis), _) => Value::String(
                time_text(i64::from(millis) * 1_000, 3)
                    .ok_or_else(|| out_of_day(path, millis.into(), "ms"))?,
            ),
            (Value::TimeMicros(micros), _) => {
                Value::String(time_text(micros, 6).ok_or_else(|| out_of_day(path, micros, "µs"))?)
            }
            (Value::Uuid(uuid), _) => Value::String(uuid.as_hyphenated().to_string()),
            (Value::Bytes(bytes), _) | (Value::Fixed(_, bytes), _) => {
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            }
            (value, _) => value,
        })
    }
}

fn out_of_day(path: &str, amount: i64, unit: &str) -> LogicalError {
    LogicalError {
        path: path.to_owned(),
        message: format!("{amount} {unit} is not a time of day"),
    }
}

fn scale_i64(scale: usize) -> i64 {
    i64::try_from(scale).unwrap_or(i64::MAX)
}

/// Every named type defined in `schema`, by full name. (apache-avro's own table
/// of names leaves out a decimal on a named `fixed`.)
pub fn collect_names(schema: &Schema, names: &mut HashMap<Name, Schema>) {
    match schema {
        Schema::Record(record) if names.insert(record.name.clone(), schema.clone()).is_none() => {
            for field in &record.fields {
                collect_names(&field.schema, names);
            }
        }
        Schema::Enum(enumeration) => {
            names.insert(enumeration.name.clone(), schema.clone());
        }
        Schema::Fixed(fixed) => {
            names.insert(fixed.name.clone(), schema.clone());
        }
        Schema::Decimal(DecimalSchema { inner, .. }) => {
            if let Schema::Fixed(fixed) = inner.as_ref() {
                names.insert(fixed.name.clone(), schema.clone());
            }
        }
        Schema::Array(array) => collect_names(&array.items, names),
        Schema::Map(map) => collect_names(&map.types, names),
        Schema::Union(union) => union.variants().iter().for_each(|v| collect_names(v, names)),
        _ => {}
    }
}

/// True when `schema` has a value that [`Plain`] converts.
fn has_logical(schema: &Schema, names: &HashMap<Name, Schema>, seen: &mut HashSet<Name>) -> bool {
    match schema {
        Schema::Decimal(_)
        | Schema::BigDecimal
        | Schema::Date
        | Schema::TimeMillis
        | Schema::TimeMicros
        | Schema::Uuid
        | Schema::Bytes
        | Schema::Fixed(_) => true,
        Schema::Array(array) => has_logical(&array.items, names, seen),
        Schema::Map(map) => has_logical(&map.types, names, seen),
        Schema::Union(union) => union.variants().iter().any(|v| has_logical(v, names, seen)),
        Schema::Record(record) => {
            seen.insert(record.name.clone())
                && record.fields.iter().any(|f| has_logical(&f.schema, names, seen))
        }
        Schema::Ref { name } => {
            !seen.contains(name) && names.get(name).is_some_and(|s| has_logical(s, names, seen))
        }
        _ => false,
    }
}

/// A decimal as text without an exponent, keeping its scale (`1234.50`).
pub fn decimal_text(decimal: &BigDecimal) -> String {
    let (_, scale) = decimal.as_bigint_and_exponent();
    if scale < 0 {
        // A negative scale (only from arithmetic) is written as an integer.
        return decimal.with_scale(0).to_plain_string();
    }
    decimal.to_plain_string()
}

/// A decimal literal: digits with an optional sign and fractional part, nothing
/// else (no exponent, no spaces), so that only what [`decimal_text`] writes, or
/// a person would, counts as a decimal.
pub fn decimal_from_text(text: &str) -> Option<BigDecimal> {
    let digits = text.strip_prefix('-').unwrap_or(text);
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let plain = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !plain(whole) || !plain(fraction) || (digits.contains('.') && fraction.is_empty())
    {
        return None;
    }
    BigDecimal::from_str(text).ok()
}

/// The number of significant digits of a decimal's unscaled value (its precision
/// in Avro's sense).
pub fn precision(decimal: &BigDecimal) -> u64 {
    let (unscaled, _) = decimal.as_bigint_and_exponent();
    let text = unscaled.magnitude().to_string();
    text.len() as u64
}

/// The unscaled integer of `decimal` at exactly `scale`, when it has no more
/// fractional digits than that and fits `precision` digits.
pub fn unscaled_at(decimal: &BigDecimal, precision_limit: usize, scale: usize) -> Result<BigInt, String> {
    let rescaled = decimal.with_scale(scale_i64(scale));
    if rescaled != *decimal {
        return Err(format!(
            "{} has more than {scale} digits after the point",
            decimal_text(decimal)
        ));
    }
    if precision(&rescaled) > precision_limit as u64 {
        return Err(format!(
            "{} has more than {precision_limit} digits, the declared precision",
            decimal_text(decimal)
        ));
    }
    Ok(rescaled.as_bigint_and_exponent().0)
}

/// Days since 1970-01-01 as `YYYY-MM-DD`.
pub fn date_text(days: i32) -> Option<String> {
    let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1)?;
    let date = epoch.checked_add_signed(chrono::TimeDelta::try_days(i64::from(days))?)?;
    Some(date.format("%Y-%m-%d").to_string())
}

/// `YYYY-MM-DD` as days since 1970-01-01.
pub fn date_from_text(text: &str) -> Option<i32> {
    let date = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()?;
    let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1)?;
    i32::try_from(date.signed_duration_since(epoch).num_days()).ok()
}

const MICROS_PER_DAY: i64 = 86_400_000_000;

/// Microseconds since midnight as `HH:MM:SS` and `digits` fractional digits.
pub fn time_text(micros: i64, digits: usize) -> Option<String> {
    if !(0..MICROS_PER_DAY).contains(&micros) {
        return None;
    }
    let seconds = micros / 1_000_000;
    let fraction = micros % 1_000_000;
    let fraction = if digits == 3 {
        format!("{:03}", fraction / 1_000)
    } else {
        format!("{fraction:06}")
    };
    Some(format!(
        "{:02}:{:02}:{:02}.{fraction}",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    ))
}

/// `HH:MM:SS[.fraction]` as microseconds since midnight.
pub fn time_from_text(text: &str) -> Option<i64> {
    let time = chrono::NaiveTime::parse_from_str(text, "%H:%M:%S%.f").ok()?;
    let since_midnight = time.signed_duration_since(chrono::NaiveTime::MIN);
    since_midnight.num_microseconds()
}

/// Standard base64 (padded) as bytes.
pub fn bytes_from_base64(text: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}
