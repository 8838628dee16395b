//! Oracles for the read models beyond `order_summary`, and the accounts domain.
//!
//! Each oracle is a plain fold over the generated events in production order,
//! written from the projection's description, not from its code. Where a rule
//! depends on event time, the lines carry explicit record timestamps (see
//! [`stamp`]) so the oracle knows them.

use std::collections::{BTreeMap, HashMap};

use chrono::DateTime;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// Gives every line a distinct record timestamp, increasing in production order.
pub fn stamp(lines: &mut [Value]) {
    for (index, line) in lines.iter_mut().enumerate() {
        line["timestamp"] = json!(1_750_000_000_000_i64 + index as i64);
    }
}

fn placed_events(lines: &[Value]) -> impl Iterator<Item = &Value> {
    lines
        .iter()
        .filter(|l| l["type"] == "OrderPlaced")
        .map(|l| &l["value"])
}

/// `customer_orders`: per customer, sorted order ids, count, lifetime value, last
/// order time.
pub fn customer_orders(lines: &[Value]) -> BTreeMap<String, Value> {
    let mut out: BTreeMap<String, (Vec<String>, i64, i64)> = BTreeMap::new();
    for v in placed_events(lines) {
        let entry = out
            .entry(v["customerId"].as_str().unwrap().to_owned())
            .or_insert((Vec::new(), 0, i64::MIN));
        entry.0.push(v["orderId"].as_str().unwrap().to_owned());
        entry.1 += v["totalCents"].as_i64().unwrap();
        entry.2 = entry.2.max(v["placedAt"].as_i64().unwrap());
    }
    out.into_iter()
        .map(|(customer, (mut ids, value, last))| {
            ids.sort();
            let count = ids.len();
            let state = json!({"customer_id": customer, "order_ids": ids, "order_count": count,
                               "lifetime_value_cents": value, "last_order_at": last});
            (customer, state)
        })
        .collect()
}

/// `revenue_by_day`: per UTC day of `placedAt`, the revenue and count of orders
/// that were not cancelled.
pub fn revenue_by_day(lines: &[Value]) -> BTreeMap<String, Value> {
    let mut placed: HashMap<String, (String, i64)> = HashMap::new();
    let mut cancelled: HashMap<String, bool> = HashMap::new();
    for line in lines {
        let order = line["value"]["orderId"].as_str().unwrap().to_owned();
        match line["type"].as_str() {
            Some("OrderPlaced") => {
                let v = &line["value"];
                let day = DateTime::from_timestamp_millis(v["placedAt"].as_i64().unwrap())
                    .unwrap()
                    .format("%Y-%m-%d")
                    .to_string();
                placed
                    .entry(order)
                    .or_insert((day, v["totalCents"].as_i64().unwrap()));
            }
            Some("OrderCancelled") if placed.contains_key(&order) => {
                cancelled.insert(order, true);
            }
            _ => {}
        }
    }
    let mut days: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for (order, (day, cents)) in placed {
        let totals = days.entry(day).or_insert((0, 0));
        if !cancelled.contains_key(&order) {
            totals.0 += cents;
            totals.1 += 1;
        }
    }
    days.into_iter()
        .map(|(day, (revenue, orders))| {
            let state = json!({"day": day, "revenue_cents": revenue, "orders": orders});
            (day, state)
        })
        .collect()
}

/// The declarative entity `order_lines` of the projections test: per order id,
/// every event counted, the customer and total from `OrderPlaced`, the charged sum,
/// the tracking id.
pub fn order_lines(lines: &[Value]) -> BTreeMap<String, Value> {
    let mut out: BTreeMap<String, Value> = BTreeMap::new();
    for line in lines {
        let v = &line["value"];
        let state = out
            .entry(v["orderId"].as_str().unwrap().to_owned())
            .or_insert_with(|| json!({}));
        state["events"] = json!(state["events"].as_i64().unwrap_or(0) + 1);
        match line["type"].as_str() {
            Some("OrderPlaced") => {
                state["customer"] = v["customerId"].clone();
                state["total_cents"] = v["totalCents"].clone();
            }
            Some("PaymentCharged") => {
                state["paid_cents"] =
                    json!(state["paid_cents"].as_i64().unwrap_or(0) + v["amountCents"].as_i64().unwrap());
            }
            Some("OrderShipped") => state["tracking"] = v["trackingId"].clone(),
            _ => {}
        }
    }
    out
}

/// The `[[projections]]` block of the declarative entity `order_lines` over
/// `topic`; [`order_lines`] is its oracle.
pub fn order_lines_projection(topic: &str) -> String {
    format!(
        r#"
[[projections]]
name = "order_lines"
topics = ["{topic}"]
[projections.declarative]
key = "event.orderId"
[[projections.declarative.on]]
event = "*"
count = ["events"]
[[projections.declarative.on]]
event = "shop.orders.OrderPlaced"
set = {{ customer = "event.customerId", total_cents = "event.totalCents" }}
[[projections.declarative.on]]
event = "shop.orders.PaymentCharged"
add = {{ paid_cents = "event.amountCents" }}
[[projections.declarative.on]]
event = "shop.orders.OrderShipped"
set = {{ tracking = "event.trackingId" }}
"#
    )
}

/// The `[[projections]]` block of the declarative aggregate `customer_stats` (the
/// projections issue's example) over `topic`; [`customer_stats`] is its oracle.
pub fn customer_stats_projection(topic: &str) -> String {
    format!(
        r#"
[[projections]]
name = "customer_stats"
topics = ["{topic}"]
[projections.declarative]
key = "event.customerId"
[[projections.declarative.on]]
event = "shop.orders.OrderPlaced"
when = "event.totalCents > 0"
set = {{ customer = "event.customerId", last_order = "event.orderId" }}
add = {{ revenue_cents = "event.totalCents", orders = "1" }}
max = {{ last_order_at = "event.placedAt" }}
append = {{ recent_orders = {{ value = "event.orderId", max_len = 5 }} }}
"#
    )
}

/// The declarative aggregate `customer_stats` (the issue's example): per customer,
/// over orders with a positive total: the latest order by event time, revenue,
/// count, latest `placedAt`, the last 5 order ids by event time.
pub fn customer_stats(lines: &[Value]) -> BTreeMap<String, Value> {
    let mut out: BTreeMap<String, Value> = BTreeMap::new();
    let mut by_time: Vec<&Value> = lines.iter().filter(|l| l["type"] == "OrderPlaced").collect();
    by_time.sort_by_key(|l| l["timestamp"].as_i64().expect("stamped lines"));
    for line in by_time {
        let v = &line["value"];
        if v["totalCents"].as_i64().unwrap() <= 0 {
            continue;
        }
        let customer = v["customerId"].as_str().unwrap().to_owned();
        let state = out
            .entry(customer.clone())
            .or_insert_with(|| json!({"recent_orders": []}));
        state["customer"] = json!(customer);
        state["last_order"] = v["orderId"].clone();
        state["revenue_cents"] =
            json!(state["revenue_cents"].as_i64().unwrap_or(0) + v["totalCents"].as_i64().unwrap());
        state["orders"] = json!(state["orders"].as_i64().unwrap_or(0) + 1);
        let at = v["placedAt"].as_i64().unwrap();
        state["last_order_at"] = json!(state["last_order_at"].as_i64().map_or(at, |m| m.max(at)));
        let recent = state["recent_orders"].as_array_mut().unwrap();
        recent.push(v["orderId"].clone());
        if recent.len() > 5 {
            recent.remove(0);
        }
    }
    out
}

/// A stream of account events on `topic`: each account opened, then deposits and
/// withdrawals interleaved with other accounts', plus movements of accounts never
/// opened (ignored).
pub fn accounts(topic: &str, count: usize, seed: u64) -> Vec<Value> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut pending: Vec<(String, Vec<Value>)> = (0..count)
        .map(|i| {
            let id = format!("acct-{seed}-{i:05}");
            let mut events = vec![json!({"type": "AccountOpened", "value": {"accountId": id, "owner": format!("owner-{i}"), "openedAt": i}})];
            for n in 0..rng.random_range(3..18) {
                let kind = if rng.random_bool(0.6) { "MoneyDeposited" } else { "MoneyWithdrawn" };
                events.push(json!({"type": kind, "value": {"accountId": id, "amountCents": rng.random_range(1..50_000), "at": n}}));
            }
            events.reverse();
            (id, events)
        })
        .collect();
    pending.push(("acct-never-opened".into(), vec![json!({"type": "MoneyDeposited", "value": {"accountId": "acct-never-opened", "amountCents": 5, "at": 0}})]));
    let mut lines = Vec::new();
    while !pending.is_empty() {
        let index = rng.random_range(0..pending.len());
        let (id, events) = &mut pending[index];
        let mut event = events.pop().unwrap();
        event["topic"] = json!(topic);
        event["key"] = json!(id.clone());
        event["namespace"] = json!("bank.accounts");
        lines.push(event);
        if events.is_empty() {
            pending.swap_remove(index);
        }
    }
    lines
}

/// `account_balance` per opened account.
pub fn account_balance(lines: &[Value]) -> BTreeMap<String, Value> {
    let mut out: BTreeMap<String, Value> = BTreeMap::new();
    for line in lines {
        let v = &line["value"];
        let id = v["accountId"].as_str().unwrap().to_owned();
        match line["type"].as_str() {
            Some("AccountOpened") => {
                out.insert(id.clone(), json!({"account_id": id, "owner": v["owner"], "balance_cents": 0, "deposits": 0, "withdrawals": 0}));
            }
            Some(kind) => {
                let Some(state) = out.get_mut(&id) else { continue };
                let amount = v["amountCents"].as_i64().unwrap();
                let (sign, counter) = if kind == "MoneyDeposited" {
                    (1, "deposits")
                } else {
                    (-1, "withdrawals")
                };
                state["balance_cents"] = json!(state["balance_cents"].as_i64().unwrap() + sign * amount);
                state[counter] = json!(state[counter].as_i64().unwrap() + 1);
            }
            None => {}
        }
    }
    out
}
