//! Reading single fields of an Avro record without deserializing all of it.

use apache_avro::types::Value;
use engine::projection::{Event, FoldError};

/// The string field `name` of the event's payload.
pub fn string_field<'e>(event: &Event<'e>, name: &str) -> Result<&'e str, FoldError> {
    let Value::Record(fields) = event.payload else {
        return Err(FoldError(format!("{} is not a record", event.name)));
    };
    match fields.iter().find(|(field, _)| field == name) {
        Some((_, Value::String(value))) => Ok(value),
        Some((_, other)) => Err(FoldError(format!(
            "{}.{name} is {other:?}, expected a string",
            event.name
        ))),
        None => Err(FoldError(format!("{} has no field {name}", event.name))),
    }
}
