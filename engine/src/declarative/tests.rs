//! Declarative projections: folding with each operation, and merging partial
//! states per operation, including ties and deletes.

use std::collections::HashMap;
use std::sync::Arc;

use apache_avro::types::Value;
use serde_json::{json, Value as Json};

use super::*;
use crate::projection::EventMeta;

type Memory = crate::projection::InMemoryState;

/// A copy of a declarative (JSON) state.
fn copy(state: &State) -> State {
    Box::new(as_json(state).unwrap().clone())
}

/// Every state of `memory` as JSON.
fn snapshot(memory: &Memory) -> HashMap<String, Json> {
    memory
        .0
        .iter()
        .map(|(k, v)| (k.clone(), as_json(v).unwrap().clone()))
        .collect()
}

fn projection(toml_text: &str) -> Declarative {
    let config: DeclarativeConfig = toml::from_str(toml_text).unwrap();
    Declarative::compile(&config).unwrap()
}

const STATS: &str = r#"
key = "event.customerId"
[[on]]
event = "shop.orders.OrderPlaced"
when = "event.totalCents > 0"
set = { last_order = "event.orderId" }
add = { revenue_cents = "event.totalCents" }
min = { first_at = "event.placedAt" }
max = { last_at = "event.placedAt" }
count = ["orders"]
append = { recent = { value = "event.orderId", max_len = 2 } }
[[on]]
event = "shop.orders.OrderCancelled"
remove = { recent = "event.orderId" }
delete = "event.reason == 'forget me'"
"#;

fn placed(
    partition: i32,
    offset: i64,
    ts: i64,
    customer: &str,
    order: &str,
    cents: i64,
) -> (String, Value, EventMeta) {
    let payload = Value::Record(vec![
        ("orderId".into(), Value::String(order.into())),
        ("customerId".into(), Value::String(customer.into())),
        ("totalCents".into(), Value::Long(cents)),
        ("placedAt".into(), Value::TimestampMillis(ts)),
    ]);
    (
        "shop.orders.OrderPlaced".into(),
        payload,
        meta(partition, offset, ts),
    )
}

fn cancelled(
    partition: i32,
    offset: i64,
    ts: i64,
    customer: &str,
    order: &str,
    reason: &str,
) -> (String, Value, EventMeta) {
    let payload = Value::Record(vec![
        ("orderId".into(), Value::String(order.into())),
        ("customerId".into(), Value::String(customer.into())),
        ("reason".into(), Value::String(reason.into())),
    ]);
    (
        "shop.orders.OrderCancelled".into(),
        payload,
        meta(partition, offset, ts),
    )
}

fn meta(partition: i32, offset: i64, ts: i64) -> EventMeta {
    EventMeta {
        topic: Arc::from("orders"),
        partition,
        offset,
        timestamp_ms: Some(ts),
        key: None,
    }
}

fn fold(projection: &Declarative, state: &mut Memory, event: &(String, Value, EventMeta)) {
    let event = Event {
        name: &event.0,
        payload: &event.1,
        meta: &event.2,
    };
    projection.apply(&event, state).unwrap();
}

#[test]
fn each_operation_folds_within_a_partition() {
    let p = projection(STATS);
    let mut state = Memory::default();
    fold(&p, &mut state, &placed(0, 1, 100, "c", "o1", 500));
    fold(&p, &mut state, &placed(0, 2, 50, "c", "o2", 250));
    fold(&p, &mut state, &placed(0, 3, 300, "c", "o3", 0)); // `when` is false
    fold(&p, &mut state, &placed(0, 4, 200, "c", "o4", 100));
    let merged = p.merge("c", vec![copy(&state.0["c"])]).unwrap().unwrap();
    assert_eq!(
        merged,
        json!({"last_order": "o4", "revenue_cents": 850, "first_at": 50, "last_at": 200, "orders": 3,
               "recent": ["o2", "o4"]})
    );
    fold(&p, &mut state, &cancelled(0, 5, 210, "c", "o4", "changed mind"));
    assert_eq!(
        p.merge("c", vec![copy(&state.0["c"])]).unwrap().unwrap()["recent"],
        json!(["o2"])
    );
    fold(&p, &mut state, &cancelled(0, 6, 220, "c", "o2", "forget me"));
    assert!(!state.0.contains_key("c"), "delete removes the key");
}

#[test]
fn events_without_the_key_field_are_ignored() {
    let p = projection(STATS);
    let mut state = Memory::default();
    let payload = Value::Record(vec![("orderId".into(), Value::String("o".into()))]);
    let event = ("shop.orders.PaymentCharged".to_owned(), payload, meta(0, 1, 1));
    fold(&p, &mut state, &event);
    assert!(state.0.is_empty());
}

/// Folds each event into the memory of its partition, then merges the partials.
fn merged(p: &Declarative, events: &[(String, Value, EventMeta)]) -> Json {
    let mut partitions: HashMap<i32, Memory> = HashMap::new();
    for event in events {
        fold(p, partitions.entry(event.2.partition).or_default(), event);
    }
    let partials = partitions
        .values()
        .filter_map(|m| m.0.get("c").map(copy))
        .collect();
    p.merge("c", partials).unwrap().unwrap()
}

#[test]
fn partials_merge_by_operation_across_partitions() {
    let p = projection(STATS);
    let events = [
        placed(0, 1, 100, "c", "a", 500),
        placed(1, 1, 400, "c", "b", 7),
        placed(0, 2, 300, "c", "d", 3),
        placed(2, 9, 200, "c", "e", 10),
    ];
    let value = merged(&p, &events);
    assert_eq!(value["revenue_cents"], 520, "add sums");
    assert_eq!(value["orders"], 4, "count sums");
    assert_eq!(value["first_at"], 100, "min of mins");
    assert_eq!(value["last_at"], 400, "max of maxes");
    assert_eq!(value["last_order"], "b", "set: latest event timestamp wins");
    assert_eq!(
        value["recent"],
        json!(["d", "b"]),
        "append: by event time, last max_len"
    );
}

#[test]
fn set_ties_break_by_partition_then_offset() {
    let p = projection(STATS);
    // Same timestamp everywhere: partition 1 beats partition 0; within a partition
    // the later offset wins.
    let events = [
        placed(1, 5, 100, "c", "from-p1", 1),
        placed(0, 9, 100, "c", "from-p0", 1),
    ];
    assert_eq!(merged(&p, &events)["last_order"], "from-p1");
    let events = [
        placed(0, 5, 100, "c", "first", 1),
        placed(0, 6, 100, "c", "second", 1),
    ];
    assert_eq!(merged(&p, &events)["last_order"], "second");
}

#[test]
fn a_delete_in_one_partition_leaves_the_others() {
    let p = projection(STATS);
    let events = [
        placed(0, 1, 100, "c", "a", 5),
        placed(1, 1, 200, "c", "b", 7),
        cancelled(0, 2, 300, "c", "a", "forget me"),
    ];
    let value = merged(&p, &events);
    assert_eq!(
        (value["revenue_cents"].clone(), value["recent"].clone()),
        (json!(7), json!(["b"]))
    );
}

#[test]
fn a_failing_expression_changes_nothing() {
    let p = projection(
        r#"
key = "event.customerId"
[[on]]
event = "*"
add = { n = "1" }
set = { ratio = "event.totalCents / (event.totalCents - 5)" }
"#,
    );
    let mut state = Memory::default();
    fold(&p, &mut state, &placed(0, 1, 1, "c", "o", 10));
    let before = snapshot(&state);
    let bad = placed(0, 2, 2, "c", "o", 5);
    let event = Event {
        name: &bad.0,
        payload: &bad.1,
        meta: &bad.2,
    };
    assert!(
        p.apply(&event, &mut state).is_err(),
        "division by zero fails the fold"
    );
    assert_eq!(snapshot(&state), before);
}

#[test]
fn compile_errors_name_the_rule_and_field() {
    let compile =
        |text: &str| Declarative::compile(&toml::from_str::<DeclarativeConfig>(text).unwrap()).unwrap_err();
    let error = compile("key = \"event.id\"\n[[on]]\nevent = \"*\"\nadd = { total = \"event.(\" }\n");
    assert_eq!(error.path, "on[0].add.total", "{error}");
    assert!(error.message.contains("does not compile"), "{error}");
    let error = compile("key = \"event.id\"\n[[on]]\nevent = \"*\"\nadd = { x = \"1\" }\n[[on]]\nevent = \"*\"\nset = { x = \"2\" }\n");
    assert_eq!(error.path, "on[1].x", "{error}");
    let error = compile("key = \"event.id\"\n[[on]]\nevent = \"*\"\nremove = { x = \"1\" }\n");
    assert_eq!(error.path, "remove.x", "{error}");
    assert_eq!(compile("key = \")\"\n").path, "key");
}

/// A schema set with `bank.Payment` whose `amount` is a `decimal(6,2)`.
fn payment_schemas() -> (tempfile::TempDir, crate::schemas::SchemaSet) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("bank")).unwrap();
    std::fs::write(
        dir.path().join("bank/Payment.v1.avsc"),
        r#"{"type": "record", "name": "Payment", "namespace": "bank", "fields": [
            {"name": "account", "type": "string"},
            {"name": "amount", "type": {"type": "bytes", "logicalType": "decimal", "precision": 6, "scale": 2}},
            {"name": "paidOn", "type": {"type": "int", "logicalType": "date"}}]}"#,
    )
    .unwrap();
    let set = crate::schemas::SchemaSet::load(dir.path(), &crate::schemas::RustUpcasters::new()).unwrap();
    (dir, set)
}

const BALANCES: &str = r#"
key = "event.account"
[[on]]
event = "bank.Payment"
add = { total = "event.amount" }
min = { smallest = "event.amount", first_day = "event.paidOn" }
max = { largest = "event.amount", last_day = "event.paidOn" }
"#;

/// A payment as the decoder hands it over: the decimal and the date as text.
fn payment(partition: i32, offset: i64, amount: &str, day: &str) -> (String, Value, EventMeta) {
    let payload = Value::Record(vec![
        ("account".into(), Value::String("a".into())),
        ("amount".into(), Value::String(amount.into())),
        ("paidOn".into(), Value::String(day.into())),
    ]);
    ("bank.Payment".into(), payload, meta(partition, offset, offset))
}

#[test]
fn decimals_add_and_compare_exactly_across_partitions() {
    let (_dir, schemas) = payment_schemas();
    let p = projection(BALANCES).with_declared_decimals(&schemas);
    let (mut p0, mut p1) = (Memory::default(), Memory::default());
    // 0.1 + 0.2 is exactly 0.30 here, unlike in a double.
    fold(&p, &mut p0, &payment(0, 1, "0.10", "2026-01-21"));
    fold(&p, &mut p0, &payment(0, 2, "0.20", "2025-12-31"));
    fold(&p, &mut p1, &payment(1, 1, "9.5", "2026-02-01"));
    fold(&p, &mut p1, &payment(1, 2, "10.00", "2026-01-01"));
    assert_eq!(snapshot(&p0)["a"]["v"]["total"], json!("0.30"));
    let merged = p
        .merge("a", vec![copy(&p0.0["a"]), copy(&p1.0["a"])])
        .unwrap()
        .unwrap();
    assert_eq!(
        merged,
        json!({"total": "19.80", "smallest": "0.10", "largest": "10.00",
               "first_day": "2025-12-31", "last_day": "2026-02-01"}),
        "the larger scale is kept; 9.5 < 10.00 by value, not as text"
    );
}

#[test]
fn a_decimal_sum_beyond_the_declared_precision_fails_the_event_and_changes_nothing() {
    let (_dir, schemas) = payment_schemas();
    let p = projection(BALANCES).with_declared_decimals(&schemas);
    let mut state = Memory::default();
    fold(&p, &mut state, &payment(0, 1, "9999.00", "2026-01-21"));
    let before = snapshot(&state);
    let over = payment(0, 2, "1.00", "2026-01-21");
    let event = Event {
        name: &over.0,
        payload: &over.1,
        meta: &over.2,
    };
    let error = p.apply(&event, &mut state).unwrap_err();
    assert!(error.0.contains("precision 6"), "{error}");
    assert_eq!(snapshot(&state), before);
    // Merging two partials whose sum overflows is an error, not a wrong value.
    let mut other = Memory::default();
    fold(&p, &mut other, &payment(1, 1, "9999.00", "2026-01-21"));
    assert!(p
        .merge("a", vec![copy(&state.0["a"]), copy(&other.0["a"])])
        .is_err());
    // A float cannot be added to a decimal.
    assert!(add_numbers(&json!("1.00"), &json!(0.5)).is_err());
    assert_eq!(add_numbers(&json!(2), &json!("0.25")).unwrap(), json!("2.25"));
}
