//! What declarative projections cost: the same 200,000 Avro order events decoded
//! and folded by two built-ins and their declarative counterparts, in one run:
//! `order_summary` vs an entity of plain field copies (which skip the CEL
//! interpreter), and `customer_orders` vs the issue's `customer_stats` (a CEL
//! guard, sums, a max and a bounded list, aggregated per customer). Run with
//! `cargo bench -p projector-projections`.
//!
//! Both pay the same decode (apache-avro, writer = reader schema) and fold into an
//! in-memory state map; no Kafka, no RocksDB, so the difference is the fold.

use std::sync::Arc;
use std::time::Instant;

use apache_avro::types::Value;
use apache_avro::Schema;
use engine::declarative::{Declarative, DeclarativeConfig};
use engine::projection::{Event, EventMeta, InMemoryState, Projection};
use serde_json::Value as Json;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EVENTS: usize = 200_000;
const ROUNDS: usize = 5;

const DECLARATIVE: &str = r#"
key = "event.orderId"
[[on]]
event = "*"
count = ["version"]
[[on]]
event = "shop.orders.OrderPlaced"
set = { order_id = "event.orderId", customer_id = "event.customerId", status = "'placed'", total_cents = "event.totalCents", currency = "event.currency" }
[[on]]
event = "shop.orders.PaymentCharged"
set = { status = "'paid'" }
[[on]]
event = "shop.orders.OrderShipped"
set = { status = "'shipped'", tracking_id = "event.trackingId" }
[[on]]
event = "shop.orders.OrderDelivered"
set = { status = "'delivered'" }
"#;

const CUSTOMER_STATS: &str = r#"
key = "event.customerId"
[[on]]
event = "shop.orders.OrderPlaced"
when = "event.totalCents > 0"
set = { customer = "event.customerId", last_order = "event.orderId" }
add = { revenue_cents = "event.totalCents", orders = "1" }
max = { last_order_at = "event.placedAt" }
append = { recent_orders = { value = "event.orderId", max_len = 5 } }
"#;

fn schema(name: &str) -> Schema {
    let dir = std::path::PathBuf::from(
        std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("../schemas/shop.orders");
    let newest = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with(&format!("{name}.v"))
        })
        .filter(|p| p.extension().is_some_and(|e| e == "avsc"))
        .max()
        .unwrap();
    Schema::parse_str(&std::fs::read_to_string(newest).unwrap()).unwrap()
}

fn record(fields: Vec<(&str, Value)>) -> Value {
    Value::Record(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}

/// (event name, schema index, Avro body) in log order.
fn encoded_events(schemas: &[(String, Schema)]) -> Vec<(usize, Vec<u8>)> {
    let mut out = Vec::with_capacity(EVENTS);
    for i in 0..EVENTS / 4 {
        let id = Value::String(format!("order-{i:07}"));
        let values = [
            record(vec![
                ("orderId", id.clone()),
                ("customerId", Value::String(format!("c-{}", i % 1000))),
                ("items", Value::Array(vec![])),
                ("itemCount", Value::Int(0)),
                ("totalCents", Value::Long(1234)),
                ("currency", Value::String("EUR".into())),
                ("placedAt", Value::TimestampMillis(i as i64)),
            ]),
            record(vec![
                ("orderId", id.clone()),
                ("amountCents", Value::Long(1234)),
                ("card", Value::String("visa".into())),
            ]),
            record(vec![
                ("orderId", id.clone()),
                ("trackingId", Value::String(format!("T-{i}"))),
                ("carrier", Value::String("DHL".into())),
                ("shippedAt", Value::TimestampMillis(i as i64)),
            ]),
            record(vec![
                ("orderId", id),
                ("deliveredAt", Value::TimestampMillis(i as i64)),
            ]),
        ];
        for (index, value) in values.into_iter().enumerate() {
            let schema = &schemas[index].1;
            let value = value.resolve(schema).unwrap();
            out.push((index, apache_avro::to_avro_datum(schema, value).unwrap()));
        }
    }
    out
}

fn run(
    projection: &dyn Projection,
    schemas: &[(String, Schema)],
    events: &[(usize, Vec<u8>)],
    keys: usize,
) -> f64 {
    let mut state = InMemoryState::default();
    let started = Instant::now();
    for (offset, (index, body)) in events.iter().enumerate() {
        let (name, schema) = &schemas[*index];
        // As the engine decodes a writer schema without named references: no
        // table of names built per datum.
        let payload =
            apache_avro::from_avro_datum_schemata(schema, Vec::new(), &mut body.as_slice(), None).unwrap();
        let meta = EventMeta {
            topic: Arc::from("orders"),
            partition: 0,
            offset: offset as i64,
            timestamp_ms: Some(offset as i64),
            key: None,
        };
        let event = Event {
            name,
            payload: &payload,
            meta: &meta,
        };
        projection.apply(&event, &mut state).unwrap();
    }
    let rate = events.len() as f64 / started.elapsed().as_secs_f64();
    assert_eq!(state.0.len(), keys, "one state per key");
    rate
}

/// (built-in name, built-in, declarative name, declarative, keys it ends with)
type Pair = (
    &'static str,
    Box<dyn Projection>,
    &'static str,
    Box<dyn Projection>,
    usize,
);

/// Upcasting cost: `OrderPlaced` v1 events (decoded) brought to v3 by the
/// repository's two CEL steps, as the decoding thread does for old events.
fn upcast_rate() -> f64 {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schemas");
    let set = engine::schemas::SchemaSet::load(&dir, &projections::upcasters()).unwrap();
    let name: Arc<str> = Arc::from("shop.orders.OrderPlaced");
    let v1 =
        &Schema::parse_str(&std::fs::read_to_string(dir.join("shop.orders/OrderPlaced.v1.avsc")).unwrap())
            .unwrap();
    let item = |i: i32| {
        record(vec![
            ("sku", Value::String(format!("sku-{i}"))),
            ("qty", Value::Int(i)),
            ("priceCents", Value::Long(100)),
        ])
    };
    let payloads: Vec<Value> = (0..EVENTS / 4)
        .map(|i| {
            record(vec![
                ("orderId", Value::String(format!("order-{i:07}"))),
                ("customerId", Value::String(format!("c-{}", i % 1000))),
                ("items", Value::Array(vec![item(1), item(2)])),
                ("total", Value::Double(12.34)),
                ("placedAt", Value::TimestampMillis(i as i64)),
            ])
            .resolve(v1)
            .unwrap()
        })
        .collect();
    let mut best = 0.0_f64;
    for _ in 0..ROUNDS {
        let batch = payloads.clone();
        let started = Instant::now();
        for payload in batch {
            let current = set.upcast(&name, 1, payload).unwrap();
            assert_eq!(current.len(), 1);
        }
        best = best.max(payloads.len() as f64 / started.elapsed().as_secs_f64());
    }
    best
}

fn main() {
    println!(
        "upcast OrderPlaced v1 -> v3 (two CEL steps), best of {ROUNDS}: {:>12.0} events/s",
        upcast_rate()
    );
    if std::env::var("FOLD_BENCH_ONLY").is_ok_and(|only| only == "upcast") {
        return;
    }
    let schemas: Vec<(String, Schema)> = ["OrderPlaced", "PaymentCharged", "OrderShipped", "OrderDelivered"]
        .iter()
        .map(|n| (format!("shop.orders.{n}"), schema(n)))
        .collect();
    let events = encoded_events(&schemas);
    let none = Json::Object(Default::default());
    let declarative =
        |text: &str| Declarative::compile(&toml::from_str::<DeclarativeConfig>(text).unwrap()).unwrap();
    let pairs: [Pair; 2] = [
        (
            "order_summary",
            projections::registry()["order_summary"](&none).unwrap(),
            "entity of field copies",
            Box::new(declarative(DECLARATIVE)),
            EVENTS / 4,
        ),
        (
            "customer_orders",
            projections::registry()["customer_orders"](&none).unwrap(),
            "customer_stats (CEL)",
            Box::new(declarative(CUSTOMER_STATS)),
            1000,
        ),
    ];
    println!(
        "fold throughput, {EVENTS} events (decode + fold, in memory), best of {ROUNDS} alternating rounds:"
    );
    for (built_in_name, built_in, declarative_name, declarative, keys) in &pairs {
        // The machine is shared and noisy: alternate the two for several rounds and
        // keep each one's best, so a burst of outside load does not decide the ratio.
        let (mut built_in_rate, mut declarative_rate) = (0.0_f64, 0.0_f64);
        for _ in 0..ROUNDS {
            built_in_rate = built_in_rate.max(run(built_in.as_ref(), &schemas, &events, *keys));
            declarative_rate = declarative_rate.max(run(declarative.as_ref(), &schemas, &events, *keys));
        }
        println!("  built-in {built_in_name:<24} {built_in_rate:>12.0} events/s");
        println!("  declarative {declarative_name:<21} {declarative_rate:>12.0} events/s");
        println!(
            "  declarative / built-in {:>22.2} (target >= 0.50)",
            declarative_rate / built_in_rate
        );
    }
}
