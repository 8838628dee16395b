//! Logical types both ways: Avro values to their meaning and JSON back to Avro.

use apache_avro::types::Value;
use apache_avro::Schema;
use serde_json::json;

use super::*;
use crate::logical::{decimal_from_text, decimal_text, precision, Plain};

/// A record with every logical type, nested in a union, an array and a map.
fn schema() -> Schema {
    Schema::parse_str(
        r#"{"type": "record", "name": "Payment", "namespace": "bank", "fields": [
            {"name": "amount", "type": {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 2}},
            {"name": "fee", "type": {"type": "fixed", "name": "Fee", "size": 8, "logicalType": "decimal", "precision": 10, "scale": 3}},
            {"name": "paidOn", "type": {"type": "int", "logicalType": "date"}},
            {"name": "cutoff", "type": {"type": "int", "logicalType": "time-millis"}},
            {"name": "precise", "type": {"type": "long", "logicalType": "time-micros"}},
            {"name": "id", "type": {"type": "string", "logicalType": "uuid"}},
            {"name": "raw", "type": "bytes"},
            {"name": "hash", "type": {"type": "fixed", "name": "Hash", "size": 4}},
            {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
            {"name": "refund", "type": ["null", {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 2}], "default": null},
            {"name": "history", "type": {"type": "array", "items": {"type": "int", "logicalType": "date"}}},
            {"name": "byCurrency", "type": {"type": "map", "values": {"type": "bytes", "logicalType": "decimal", "precision": 6, "scale": 1}}},
            {"name": "rate", "type": {"type": "bytes", "logicalType": "big-decimal"}}
        ]}"#,
    )
    .unwrap()
}

/// The JSON form of one payment, as projections and readers see it.
fn meaning() -> serde_json::Value {
    json!({
        "amount": "1234.50",
        "fee": "-0.125",
        "paidOn": "2026-01-21",
        "cutoff": "13:45:00.250",
        "precise": "00:00:01.000002",
        "id": "5f0c7a52-3c1b-4c8e-9d2e-7a0b8f1e2d3c",
        "raw": "AP8Q",
        "hash": "3q2+7w==",
        "at": 1_769_000_000_000_i64,
        "refund": "0.01",
        "history": ["1970-01-01", "1969-12-31"],
        "byCurrency": {"EUR": "99999.9"},
        "rate": "-0.000123456789012345678901234567890"
    })
}

fn field<'v>(value: &'v Value, name: &str) -> &'v Value {
    match value {
        Value::Record(fields) => &fields.iter().find(|(n, _)| n == name).unwrap().1,
        other => panic!("not a record: {other:?}"),
    }
}

#[test]
fn json_to_avro_builds_the_encodings_and_back_gives_the_meaning() {
    let schema = schema();
    let value = from_json(&meaning(), &schema).unwrap();
    assert!(value.validate(&schema), "{value:?}");
    // The encodings, as Avro defines them.
    assert_eq!(
        field(&value, "amount"),
        &Value::Decimal(vec![0x01, 0xE2, 0x3A].into())
    );
    assert_eq!(field(&value, "paidOn"), &Value::Date(20_474));
    assert_eq!(field(&value, "cutoff"), &Value::TimeMillis(49_500_250));
    assert_eq!(field(&value, "precise"), &Value::TimeMicros(1_000_002));
    assert_eq!(field(&value, "raw"), &Value::Bytes(vec![0x00, 0xFF, 0x10]));
    assert_eq!(
        field(&value, "hash"),
        &Value::Fixed(4, vec![0xDE, 0xAD, 0xBE, 0xEF])
    );
    // Through the Avro binary encoding and back, then to their meaning.
    let bytes = apache_avro::to_avro_datum(&schema, value).unwrap();
    let decoded = apache_avro::from_avro_datum(&schema, &mut bytes.as_slice(), None).unwrap();
    let plain = Plain::for_schema(&schema, &[]).expect("the schema has logical types");
    let json = to_json(plain.convert(decoded).unwrap()).unwrap();
    assert_eq!(json, meaning());
}

#[test]
fn a_schema_without_logical_types_needs_no_conversion() {
    let schema = Schema::parse_str(
        r#"{"type": "record", "name": "E", "fields": [
            {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
            {"name": "n", "type": ["null", "long"]}]}"#,
    )
    .unwrap();
    assert!(Plain::for_schema(&schema, &[]).is_none());
}

#[test]
fn a_named_type_from_a_reference_is_looked_up() {
    let (schema, schemata) = Schema::parse_str_with_list(
        r#"{"type": "record", "name": "Paid", "namespace": "bank", "fields": [{"name": "m", "type": "bank.Money"}]}"#,
        [r#"{"type": "fixed", "name": "Money", "namespace": "bank", "size": 8, "logicalType": "decimal", "precision": 12, "scale": 2}"#],
    )
    .unwrap();
    assert_eq!(schemata.len(), 1);
    let plain = Plain::for_schema(&schema, &schemata).expect("Money is a decimal");
    let value = Value::Record(vec![("m".into(), Value::Decimal(vec![0x04, 0xD2].into()))]);
    assert_eq!(
        to_json(plain.convert(value).unwrap()).unwrap(),
        json!({"m": "12.34"})
    );
}

#[test]
fn values_that_do_not_fit_are_refused_with_their_field() {
    let schema = schema();
    let refused = |field: &str, value: serde_json::Value| {
        let mut json = meaning();
        json[field] = value;
        match from_json(&json, &schema).unwrap_err() {
            ConversionError::Mismatch { path, message } => {
                assert_eq!(path, format!("event.{field}"), "{message}");
                message
            }
            other => panic!("a mismatch, got {other}"),
        }
    };
    assert!(refused("amount", json!("1.234")).contains("more than 2 digits after the point"));
    assert!(refused("amount", json!("12345678901.00")).contains("declared precision"));
    refused("amount", json!(12.5));
    refused("amount", json!("1e3"));
    refused("amount", json!("12."));
    refused("paidOn", json!("2026-02-30"));
    refused("cutoff", json!("24:00:00"));
    refused("cutoff", json!("12:00:00.0001"));
    refused("raw", json!("not base64!"));
    refused("hash", json!("AAAA"));
    // Integers are still the encodings themselves.
    let mut json = meaning();
    json["paidOn"] = json!(1);
    json["amount"] = json!(3);
    let value = from_json(&json, &schema).unwrap();
    assert_eq!(field(&value, "paidOn"), &Value::Date(1));
    assert_eq!(field(&value, "amount"), &Value::Decimal(vec![0x01, 0x2C].into()));
}

#[test]
fn decoded_values_without_a_meaning_are_errors_naming_the_field() {
    let schema = Schema::parse_str(
        r#"{"type": "record", "name": "E", "fields": [
            {"name": "t", "type": {"type": "int", "logicalType": "time-millis"}}]}"#,
    )
    .unwrap();
    let plain = Plain::for_schema(&schema, &[]).unwrap();
    let error = plain
        .convert(Value::Record(vec![("t".into(), Value::TimeMillis(86_400_000))]))
        .unwrap_err();
    assert_eq!(error.path, "event.t");
    let dates = Schema::parse_str(
        r#"{"type": "record", "name": "E", "fields": [
            {"name": "d", "type": {"type": "int", "logicalType": "date"}}]}"#,
    )
    .unwrap();
    let plain = Plain::for_schema(&dates, &[]).unwrap();
    assert!(plain
        .convert(Value::Record(vec![("d".into(), Value::Date(i32::MAX))]))
        .is_err());
}

#[test]
fn decimal_text_keeps_the_scale_and_reads_only_plain_literals() {
    for text in ["0.00", "-0.125", "1234.50", "7", "-12"] {
        let decimal = decimal_from_text(text).unwrap();
        assert_eq!(decimal_text(&decimal), text);
    }
    for text in ["", "-", ".5", "5.", "1e3", " 1", "1,5", "+1", "0x10", "NaN"] {
        assert!(decimal_from_text(text).is_none(), "{text}");
    }
    assert_eq!(precision(&decimal_from_text("-1234.50").unwrap()), 6);
}

#[test]
fn typed_events_read_decimals_and_dates() {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Payment {
        amount: rust_decimal::Decimal,
        paid_on: chrono::NaiveDate,
        id: String,
    }
    let schema = schema();
    let value = from_json(&meaning(), &schema).unwrap();
    let plain = Plain::for_schema(&schema, &[]).unwrap().convert(value).unwrap();
    let meta = crate::projection::EventMeta {
        topic: "payments".into(),
        partition: 0,
        offset: 0,
        timestamp_ms: None,
        key: None,
    };
    let event = crate::projection::Event {
        name: "bank.Payment",
        payload: &plain,
        meta: &meta,
    };
    let payment: Payment = event.parse().unwrap();
    assert_eq!(payment.amount, rust_decimal::Decimal::new(123_450, 2));
    assert_eq!(
        payment.paid_on,
        chrono::NaiveDate::from_ymd_opt(2026, 1, 21).unwrap()
    );
    assert_eq!(payment.id, "5f0c7a52-3c1b-4c8e-9d2e-7a0b8f1e2d3c");
}
