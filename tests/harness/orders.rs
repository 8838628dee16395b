//! The demo order domain for tests: a seeded event generator and an oracle.
//!
//! The oracle is a plain fold written here, independently of the projection code,
//! from the rules in the foundation issue: status follows the order's lifecycle
//! events, `version` counts them, events of an order never placed are ignored.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// A generated stream of order events, in production order.
pub struct OrderStream {
    /// One JSON line per event, in the format `produce.py` reads.
    pub lines: Vec<Value>,
    /// Order ids that were placed.
    pub placed: Vec<String>,
    /// Order ids that only ever got events without an `OrderPlaced`.
    pub ghosts: Vec<String>,
}

/// `orders` orders with 4 events each, interleaved at random, plus some events of
/// orders that were never placed (ignored by `order_summary`).
pub fn generate(topic: &str, orders: usize, seed: u64) -> OrderStream {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut pending: Vec<(String, Vec<Value>)> = (0..orders)
        .map(|i| {
            let order_id = format!("order-{seed}-{i:06}");
            let events = lifecycle(&mut rng, &order_id, 1_700_000_000_000 + i as i64 * 37_000);
            (order_id, events)
        })
        .collect();
    let placed = pending.iter().map(|(id, _)| id.clone()).collect();
    let ghosts: Vec<String> = (0..orders / 100 + 1)
        .map(|i| format!("ghost-{seed}-{i}"))
        .collect();
    for ghost in &ghosts {
        pending.push((
            ghost.clone(),
            vec![json!({"type": "OrderShipped", "value": {"orderId": ghost, "trackingId": "T-ghost", "shippedAt": 1}})],
        ));
    }
    for (_, events) in pending.iter_mut() {
        events.reverse();
    }
    let mut lines = Vec::new();
    while !pending.is_empty() {
        let index = rng.random_range(0..pending.len());
        let (order_id, events) = &mut pending[index];
        let mut event = events.pop().expect("no empty lists are kept");
        event["topic"] = json!(topic);
        event["key"] = json!(order_id.clone());
        lines.push(event);
        if events.is_empty() {
            pending.swap_remove(index);
        }
    }
    OrderStream {
        lines,
        placed,
        ghosts,
    }
}

/// `first` then `second`, as one stream.
pub fn concat(first: &OrderStream, second: &OrderStream) -> OrderStream {
    OrderStream {
        lines: [first.lines.clone(), second.lines.clone()].concat(),
        placed: [first.placed.clone(), second.placed.clone()].concat(),
        ghosts: [first.ghosts.clone(), second.ghosts.clone()].concat(),
    }
}

fn lifecycle(rng: &mut StdRng, order_id: &str, at: i64) -> Vec<Value> {
    let items: Vec<Value> = (0..rng.random_range(1..4))
        .map(|n| json!({"sku": format!("sku-{n}"), "qty": rng.random_range(1..5), "priceCents": rng.random_range(100..10_000)}))
        .collect();
    let total: i64 = items
        .iter()
        .map(|i| i["qty"].as_i64().unwrap() * i["priceCents"].as_i64().unwrap())
        .sum();
    let currency = ["EUR", "USD", "GBP"][rng.random_range(0..3)];
    let placed = json!({"type": "OrderPlaced", "value": {
        "orderId": order_id, "customerId": format!("customer-{}", rng.random_range(0..500)),
        "items": items, "totalCents": total, "currency": currency, "placedAt": at}});
    let charged = json!({"type": "PaymentCharged", "value": {"orderId": order_id, "amountCents": total, "card": "visa"}});
    let shipped = json!({"type": "OrderShipped", "value": {"orderId": order_id, "trackingId": format!("T-{order_id}"), "shippedAt": at + 10}});
    let delivered = json!({"type": "OrderDelivered", "value": {"orderId": order_id, "deliveredAt": at + 20}});
    let cancelled = json!({"type": "OrderCancelled", "value": {"orderId": order_id, "reason": "changed mind", "cancelledAt": at + 30}});
    match rng.random_range(0..10) {
        0..=5 => vec![placed, charged, shipped, delivered],
        6..=7 => vec![placed, charged, shipped, cancelled],
        _ => vec![placed, cancelled, charged.clone(), charged],
    }
}

/// Rewrites a share of the stream's events to older schema versions, as a log
/// that has lived through schema changes holds them: `OrderPlaced` as v1 (with its
/// variants that differ only in docs or field order, registered as schemas of
/// their own) and v2, `OrderShipped` as v1.
pub fn mix_versions(stream: &mut OrderStream, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let variants = crate::repo_root().join("tests/python/variants");
    for line in stream.lines.iter_mut() {
        match line["type"].as_str() {
            Some("OrderPlaced") => match rng.random_range(0..6) {
                0..=2 => {
                    let value = line["value"].as_object_mut().expect("an object");
                    let cents = value
                        .remove("totalCents")
                        .and_then(|c| c.as_i64())
                        .expect("totalCents");
                    value.remove("currency");
                    value.insert("total".into(), json!(cents as f64 / 100.0));
                    line["version"] = json!(1);
                    match rng.random_range(0..3) {
                        0 => line["schema_file"] = json!(variants.join("OrderPlaced.v1.docs.avsc")),
                        1 => line["schema_file"] = json!(variants.join("OrderPlaced.v1.reordered.avsc")),
                        _ => {}
                    }
                }
                3 => line["version"] = json!(2),
                _ => {}
            },
            Some("OrderShipped") if rng.random_bool(0.5) => line["version"] = json!(1),
            _ => {}
        }
    }
}

/// The expected `order_summary` state of every placed order.
pub fn oracle(lines: &[Value]) -> BTreeMap<String, Value> {
    let mut states: BTreeMap<String, Value> = BTreeMap::new();
    for line in lines {
        let order_id = line["value"]["orderId"].as_str().expect("orderId").to_owned();
        let kind = line["type"].as_str().expect("type");
        if kind == "OrderPlaced" {
            let v = &line["value"];
            // OrderPlaced v1 carried `total` in euros; the v1 -> v2 upcast rule is
            // totalCents = round(total * 100), currency = "EUR".
            let (total_cents, currency) = match v.get("total").and_then(Value::as_f64) {
                Some(total) => (json!((total * 100.0).round() as i64), json!("EUR")),
                None => (v["totalCents"].clone(), v["currency"].clone()),
            };
            let previous = states.get(&order_id);
            let version = previous.map_or(0, |p| p["version"].as_u64().unwrap()) + 1;
            let tracking = previous.map_or(Value::Null, |p| p["tracking_id"].clone());
            states.insert(
                order_id.clone(),
                json!({"order_id": order_id, "customer_id": v["customerId"], "status": "placed",
                       "total_cents": total_cents, "currency": currency,
                       "tracking_id": tracking, "version": version}),
            );
            continue;
        }
        let Some(state) = states.get_mut(&order_id) else {
            continue;
        };
        let status = match kind {
            "PaymentCharged" => "paid",
            "OrderShipped" => {
                state["tracking_id"] = line["value"]["trackingId"].clone();
                "shipped"
            }
            "OrderDelivered" => "delivered",
            "OrderCancelled" => "cancelled",
            other => panic!("unexpected event type {other}"),
        };
        state["status"] = json!(status);
        state["version"] = json!(state["version"].as_u64().unwrap() + 1);
    }
    states
}
