//! Projections registered through config, on real parts: four built-ins and two
//! declarative projections (an entity, and an aggregate across partitions) over
//! 50,000+ events in 8 partitions equal their oracles on every key; scans page
//! through keys in order; a declarative projection added to the config of a
//! running deployment backfills from offset 0 while the others are untouched.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Result};
use projector_tests::read_models::{self, stamp};
use projector_tests::{
    assert_matches, orders, produce, wait_applied, worker_config, write_events, Broker, Registry, Worker,
};
use serde_json::Value;

/// Four built-ins; with [`configured`], also the declarative `order_lines`.
const BUILT_INS: &str = r#"
[[projections]]
name = "order_summary"
kind = "order_summary"
topics = ["orders"]

[[projections]]
name = "customer_orders"
kind = "customer_orders"
topics = ["orders"]

[[projections]]
name = "revenue_by_day"
kind = "revenue_by_day"
topics = ["orders"]

[[projections]]
name = "account_balance"
kind = "account_balance"
topics = ["accounts"]
"#;

/// The projections of the first run: the built-ins and `order_lines`.
fn configured() -> String {
    format!("{BUILT_INS}{}", read_models::order_lines_projection("orders"))
}

/// Pages through every key of `projection` two hundred at a time.
fn scan_all(worker: &Worker, projection: &str) -> Result<BTreeMap<String, Value>> {
    let mut all = BTreeMap::new();
    let mut after: Option<String> = None;
    loop {
        let mut path = format!("/projections/{projection}/state?limit=200");
        if let Some(after) = &after {
            path.push_str(&format!("&after={after}"));
        }
        let (status, page) = worker.get(&path)?;
        ensure!(
            status == 200 && page["as_of"].is_object(),
            "scan: {status} {page}"
        );
        let mut previous = after.clone();
        for item in page["items"].as_array().unwrap_or(&Vec::new()) {
            let key = item["key"].as_str().unwrap_or_default().to_owned();
            ensure!(previous.as_deref() < Some(key.as_str()), "scan keys are in order");
            previous = Some(key.clone());
            all.insert(key, item["value"].clone());
        }
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => return Ok(all),
        }
    }
}

fn offsets_of(worker: &Worker, projection: &str) -> Result<Value> {
    Ok(worker.projection(projection)?["offsets"].clone())
}

#[test]
fn built_in_and_declarative_projections_equal_their_oracles_and_new_ones_backfill() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Broker::start(dir.path())?;
    broker.create_topic("orders", 8)?;
    broker.create_topic("accounts", 8)?;
    let registry = Registry::start(dir.path())?;

    let orders = orders::generate("orders", 10_000, 21);
    let accounts = read_models::accounts("accounts", 1_000, 21);
    let mut lines: Vec<Value> = orders.lines.iter().chain(&accounts).cloned().collect();
    stamp(&mut lines);
    ensure!(lines.len() >= 50_000, "{} events", lines.len());
    produce(
        &broker,
        &registry,
        &write_events(dir.path(), "events.jsonl", &lines)?,
    )?;
    let order_lines: Vec<Value> = lines.iter().filter(|l| l["topic"] == "orders").cloned().collect();

    let data = dir.path().join("data");
    let mut worker = Worker::start(
        dir.path(),
        &worker_config(&broker, &registry, &data, &configured()),
    )?;
    for (name, count) in [
        ("order_summary", order_lines.len()),
        ("customer_orders", order_lines.len()),
        ("revenue_by_day", order_lines.len()),
        ("order_lines", order_lines.len()),
        ("account_balance", accounts.len()),
    ] {
        wait_applied(&mut worker, name, count, Duration::from_secs(300))?;
    }
    assert_matches(&worker, "order_summary", &orders::oracle(&order_lines))?;
    assert_matches(
        &worker,
        "customer_orders",
        &read_models::customer_orders(&order_lines),
    )?;
    let days = read_models::revenue_by_day(&order_lines);
    ensure!(days.len() >= 3, "orders span several days");
    assert_matches(&worker, "revenue_by_day", &days)?;
    assert_matches(&worker, "order_lines", &read_models::order_lines(&order_lines))?;
    assert_matches(
        &worker,
        "account_balance",
        &read_models::account_balance(&accounts),
    )?;
    let (status, _) = worker.get("/projections/account_balance/state/acct-never-opened")?;
    ensure!(status == 404, "movements of an account never opened are ignored");

    // Scans: every day and nothing else (the per-order bookkeeping stays hidden).
    assert_eq!(scan_all(&worker, "revenue_by_day")?, days);
    let (status, page) = worker.get("/projections/order_summary/state?prefix=order-21-00001&limit=100000")?;
    ensure!(
        status == 200 && page["items"].as_array().map(Vec::len) == Some(10),
        "prefix scan: {page}"
    );

    // A new declarative projection joins the deployment: it backfills from offset 0,
    // the others' offsets and state do not move.
    let before: Vec<(String, Value)> = [
        "order_summary",
        "customer_orders",
        "revenue_by_day",
        "order_lines",
        "account_balance",
    ]
    .iter()
    .map(|name| Ok((name.to_string(), offsets_of(&worker, name)?)))
    .collect::<Result<_>>()?;
    worker.service.signal("TERM")?;
    let status = worker.service.wait_exit(Duration::from_secs(30))?;
    ensure!(status.success(), "SIGTERM stops the worker cleanly: {status}");
    let config = worker_config(
        &broker,
        &registry,
        &data,
        &format!(
            "{}{}",
            configured(),
            read_models::customer_stats_projection("orders")
        ),
    );
    let mut worker = Worker::start(dir.path(), &config)?;
    wait_applied(
        &mut worker,
        "customer_stats",
        order_lines.len(),
        Duration::from_secs(300),
    )?;
    assert_matches(
        &worker,
        "customer_stats",
        &read_models::customer_stats(&order_lines),
    )?;
    for (name, offsets) in before {
        assert_eq!(
            offsets_of(&worker, &name)?,
            offsets,
            "{name}'s offsets are unchanged"
        );
    }
    assert_matches(
        &worker,
        "customer_orders",
        &read_models::customer_orders(&order_lines),
    )?;
    assert_matches(&worker, "order_summary", &orders::oracle(&order_lines))?;
    Ok(())
}
