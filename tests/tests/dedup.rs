//! Dedup by event id on real parts: a producer re-sends a random 10% of the
//! events (same id, a new offset: right after the original, thousands of offsets
//! later, and after a worker restart) while the worker is SIGKILLed. The state
//! equals the oracle over the unique events for `order_summary` (ids from a
//! CloudEvents header; its `version` shows any double apply) and for the
//! declarative aggregate `customer_stats` across partitions (ids from a CEL
//! expression). A fresh worker folding the whole log counts every re-sent event
//! as a duplicate and every event without an id as such.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{ensure, Result};
use projector_tests::read_models::{self, stamp};
use projector_tests::{
    assert_matches, metric_value, orders, produce, produce_command, wait_applied, worker_config,
    write_events, Broker, Registry, Worker,
};
use rand::Rng;
use serde_json::{json, Value};

/// Both projections, each folding every event id once.
fn projections() -> String {
    format!(
        r#"
[[projections]]
name = "order_summary"
kind = "order_summary"
topics = ["orders"]
[projections.dedup]
header = "ce_id"
{}[projections.dedup]
id = "event.orderId + '/' + meta.event"
"#,
        read_models::customer_stats_projection("orders")
    )
}

/// Waits until both projections have applied `events` messages.
fn wait_both(worker: &mut Worker, events: usize) -> Result<()> {
    for name in ["order_summary", "customer_stats"] {
        wait_applied(worker, name, events, Duration::from_secs(180))?;
    }
    Ok(())
}

fn counter(worker: &Worker, name: &str, projection: &str) -> Result<f64> {
    Ok(metric_value(&worker.metrics()?, name, &[("projection", projection)]).unwrap_or(0.0))
}

#[test]
fn re_sent_events_are_folded_once_through_sigkills_and_restarts() -> Result<()> {
    let mut rng = projector_tests::seeded_rng("dedup");
    let dir = tempfile::tempdir()?;
    let broker = Broker::start(dir.path())?;
    broker.create_topic("orders", 2)?;
    let registry = Registry::start(dir.path())?;

    // Unique events, each with its id in `ce_id`, but a few that carry none.
    let stream = orders::generate("orders", 2_000, rng.random());
    let mut unique = stream.lines.clone();
    stamp(&mut unique);
    let mut without_id = 0;
    for (index, line) in unique.iter_mut().enumerate() {
        if index % 250 == 17 {
            without_id += 1;
        } else {
            line["headers"] = json!({"ce_id": format!("evt-{index:06}")});
        }
    }

    // A random 10% re-sent: a third right after the original, a third 4,000
    // events later in production order (about 2,000 offsets later in their
    // partition of two), a third after a worker restart.
    let (mut first, mut after_restart) = (Vec::new(), Vec::new());
    let mut later: Vec<(usize, Value)> = Vec::new();
    let mut resent = 0;
    for (index, line) in unique.iter().enumerate() {
        first.push(line.clone());
        while later.first().is_some_and(|(at, _)| *at <= index) {
            first.push(later.remove(0).1);
        }
        if line.get("headers").is_none() || !rng.random_bool(0.1) {
            continue;
        }
        resent += 1;
        match rng.random_range(0..3) {
            0 => first.push(line.clone()),
            1 => later.push((index + 4_000, line.clone())),
            _ => after_restart.push(line.clone()),
        }
    }
    first.extend(later.into_iter().map(|(_, line)| line));
    ensure!(resent >= 600, "{resent} events re-sent");
    let total = first.len() + after_restart.len();

    let home = dir.path().join("worker");
    std::fs::create_dir_all(&home)?;
    let config = worker_config(&broker, &registry, &home.join("data"), &projections());
    let mut worker = Worker::start(&home, &config)?;
    let mut producer = produce_command(
        &broker,
        &registry,
        &write_events(dir.path(), "first.jsonl", &first)?,
        1_500,
    )
    .spawn()?;
    // Killed twice while the producer writes, mid-batch.
    for applied in [2_000, 5_000] {
        wait_applied(&mut worker, "order_summary", applied, Duration::from_secs(120))?;
        worker.restart(&home)?;
    }
    ensure!(producer.wait()?.success(), "the producer finished");
    wait_both(&mut worker, first.len())?;
    // Killed once more, then the rest of the re-sends.
    worker.restart(&home)?;
    produce(
        &broker,
        &registry,
        &write_events(dir.path(), "after_restart.jsonl", &after_restart)?,
    )?;
    wait_both(&mut worker, total)?;

    assert_matches(&worker, "order_summary", &orders::oracle(&unique))?;
    assert_matches(&worker, "customer_stats", &read_models::customer_stats(&unique))?;

    // A fresh worker (own store and group) folds the whole log once: it passes
    // over every re-sent event, and for customer_stats also the second of two
    // identical charges (its id is order and event type).
    let fresh_home = dir.path().join("fresh");
    std::fs::create_dir_all(&fresh_home)?;
    let fresh_config = worker_config(&broker, &registry, &fresh_home.join("data"), &projections()).replace(
        "group_prefix = \"projector-test\"",
        "group_prefix = \"projector-fresh\"",
    );
    let mut fresh = Worker::start(&fresh_home, &fresh_config)?;
    wait_both(&mut fresh, total)?;
    assert_matches(&fresh, "order_summary", &orders::oracle(&unique))?;
    let duplicates = counter(&fresh, "projector_duplicate_events_total", "order_summary")?;
    ensure!(
        duplicates == resent as f64,
        "order_summary passed over {duplicates} duplicates; {resent} were re-sent"
    );
    let missing = counter(&fresh, "projector_events_without_id_total", "order_summary")?;
    ensure!(
        missing == f64::from(without_id),
        "{missing} events without an id counted; {without_id} were sent without one"
    );
    let mut ids = HashSet::new();
    let same_id = unique
        .iter()
        .filter(|l| {
            let id = format!(
                "{}/shop.orders.{}",
                l["value"]["orderId"],
                l["type"].as_str().unwrap_or("")
            );
            !ids.insert(id)
        })
        .count();
    let duplicates = counter(&fresh, "projector_duplicate_events_total", "customer_stats")?;
    ensure!(
        duplicates == (resent + same_id) as f64,
        "customer_stats passed over {duplicates} duplicates; {resent} were re-sent and {same_id} \
         events repeat an earlier one's order and type"
    );
    let folded = counter(&fresh, "projector_events_applied_total", "customer_stats")?;
    ensure!(
        folded == (unique.len() - same_id) as f64,
        "customer_stats folded {folded} events of {} unique ids",
        unique.len() - same_id
    );
    Ok(())
}
