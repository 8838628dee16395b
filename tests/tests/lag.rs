//! Lag as operators page on it, on real parts: under a continuous stream that the
//! projection keeps up with, lag in seconds stays small (it is the age of the
//! oldest unapplied event, not how long some lag has lasted); a transactional
//! producer's topic (commit markers, aborted transactions) shows zero lag once
//! caught up; with two workers in one group each exports only the partitions it
//! owns.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use projector_tests::orders::{self, OrderStream};
use projector_tests::{
    assert_state_matches_oracle, metric_value, produce_command, produce_orders, start_order_summary_worker,
    wait_for_oracle, wait_until, worker_config, write_events, Broker, Registry, Worker,
};
use serde_json::json;

/// Every `projector_consumer_lag_*` sample of `projection`: (metric, partition label, value).
fn lag_samples(worker: &Worker, projection: &str) -> Result<Vec<(String, String, f64)>> {
    let text = worker.metrics()?;
    let mut samples = Vec::new();
    for line in text.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Some((metric, labels)) = series.split_once('{') else {
            continue;
        };
        if !metric.starts_with("projector_consumer_lag_")
            || !labels.contains(&format!("projection=\"{projection}\""))
        {
            continue;
        }
        let partition = labels
            .split(',')
            .find_map(|pair| pair.strip_prefix("partition=\""))
            .and_then(|p| p.strip_suffix('"').or(p.strip_suffix("\"}")))
            .context("a partition label")?;
        samples.push((metric.to_owned(), partition.to_owned(), value.parse()?));
    }
    Ok(samples)
}

/// The partitions `projection`'s lag series cover on `worker`.
fn lag_partitions(worker: &Worker, projection: &str) -> BTreeSet<String> {
    lag_samples(worker, projection)
        .unwrap_or_default()
        .into_iter()
        .map(|(_, partition, _)| partition)
        .collect()
}

#[test]
fn lag_in_seconds_stays_small_while_a_projection_keeps_up() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Broker::start(dir.path())?;
    broker.create_topic("orders", 4)?;
    let registry = Registry::start(dir.path())?;
    // Batches of up to 200 ms keep some lag in every partition at every moment,
    // as a busy stream does: lag in events never touches 0.
    let config = worker_config(
        &broker,
        &registry,
        &dir.path().join("data"),
        &projector_tests::order_summary_projections(&[("order_summary", "orders")]),
    )
    .replace("batch_max_wait_ms = 50", "batch_max_wait_ms = 200");
    let worker = Worker::start(dir.path(), &config)?;
    wait_until("the worker to be ready", Duration::from_secs(60), || {
        worker.get("/readyz").is_ok_and(|(s, _)| s == 200)
    })?;

    let stream = orders::generate("orders", 2_000, 71);
    let events = write_events(dir.path(), "stream.jsonl", &stream.lines)?;
    let mut producer = produce_command(&broker, &registry, &events, 250);
    producer.arg("--repeat-for").arg("70");
    let mut producer =
        projector_tests::Service::start("producer", producer, &dir.path().join("producer.log"))?;
    wait_until("events to flow", Duration::from_secs(60), || {
        worker.applied_offsets("order_summary").is_ok_and(|n| n > 500)
    })?;

    let mut worst = (0.0_f64, String::new());
    let mut lagging_samples = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        producer.check_alive()?;
        for (metric, partition, value) in lag_samples(&worker, "order_summary")? {
            if metric == "projector_consumer_lag_seconds" && value > worst.0 {
                worst = (value, partition.clone());
            }
            if metric == "projector_consumer_lag_events" && value > 0.0 {
                lagging_samples += 1;
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    println!(
        "worst lag over 60 s: {:.3} s (partition {}); samples with events unapplied: {lagging_samples}",
        worst.0, worst.1
    );
    ensure!(
        lagging_samples > 0,
        "the stream kept some lag in events (else this proves nothing)"
    );
    ensure!(
        worst.0 < 2.0,
        "lag in seconds stays under 2 s while the projection keeps up: {:.3} s on partition {}",
        worst.0,
        worst.1
    );
    Ok(())
}

/// The events of `stream` grouped in transactions of about 20 records; every
/// third transaction is aborted. Returns the lines to produce and the stream of
/// the committed events only.
fn in_transactions(stream: &OrderStream) -> (Vec<serde_json::Value>, OrderStream) {
    let mut lines = Vec::new();
    let mut committed = Vec::new();
    for (index, line) in stream.lines.iter().enumerate() {
        let txn = index / 20;
        let abort = txn % 3 == 2;
        let mut line = line.clone();
        line["txn"] = json!(txn);
        if abort {
            line["abort"] = json!(true);
        } else {
            committed.push(line.clone());
        }
        lines.push(line);
    }
    // An order placed in an aborted transaction was never placed.
    let placed_committed: BTreeSet<String> = committed
        .iter()
        .filter(|l| l["type"] == "OrderPlaced")
        .filter_map(|l| l["value"]["orderId"].as_str().map(str::to_owned))
        .collect();
    let ghosts = stream
        .placed
        .iter()
        .filter(|id| !placed_committed.contains(*id))
        .cloned()
        .chain(stream.ghosts.iter().cloned())
        .collect();
    let expected = OrderStream {
        lines: committed,
        placed: placed_committed.into_iter().collect(),
        ghosts,
    };
    (lines, expected)
}

#[test]
fn a_transactional_topic_shows_zero_lag_once_caught_up() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Broker::start(dir.path())?;
    broker.create_topic("orders", 4)?;
    let registry = Registry::start(dir.path())?;
    let worker = start_order_summary_worker(dir.path(), &broker, &registry)?;
    let stream = orders::generate("orders", 300, 72);
    let (lines, committed) = in_transactions(&stream);
    let events = write_events(dir.path(), "transactions.jsonl", &lines)?;
    let mut producer = produce_command(&broker, &registry, &events, 0);
    producer.arg("--transactional").arg("lag-test");
    projector_tests::run_to_completion(producer)?;

    // Aborted events are never applied: state is the oracle of the committed ones.
    let mut last = Err(anyhow::anyhow!("not checked yet"));
    wait_until(
        "state to equal the committed events' oracle",
        Duration::from_secs(120),
        || {
            last = assert_state_matches_oracle(&worker, &committed);
            last.is_ok()
        },
    )
    .with_context(|| format!("{last:?}"))?;

    // Caught up: every partition reports 0 in events and seconds, and keeps doing
    // so (commit markers are never "applied", they are not lag).
    let all_zero = |worker: &Worker| -> bool {
        lag_samples(worker, "order_summary")
            .is_ok_and(|samples| samples.len() == 8 && samples.iter().all(|(_, _, value)| *value == 0.0))
    };
    let mut seen = Vec::new();
    wait_until("lag to be 0 on every partition", Duration::from_secs(30), || {
        seen = lag_samples(&worker, "order_summary").unwrap_or_default();
        all_zero(&worker)
    })
    .with_context(|| format!("lag samples: {seen:?}"))?;
    let deadline = Instant::now() + Duration::from_secs(6);
    while Instant::now() < deadline {
        let samples = lag_samples(&worker, "order_summary")?;
        ensure!(all_zero(&worker), "lag stays 0 once caught up: {samples:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let status = worker.projection("order_summary")?;
    ensure!(
        status["lag"]["events"] == 0 && status["lag"]["seconds"] == 0.0,
        "the API's lag is 0 too: {}",
        status["lag"]
    );
    ensure!(
        metric_value(
            &worker.metrics()?,
            "projector_projection_up",
            &[("projection", "order_summary")]
        ) == Some(1.0),
        "up"
    );
    Ok(())
}

#[test]
fn each_worker_exports_lag_only_for_the_partitions_it_owns() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Broker::start(dir.path())?;
    broker.create_topic("orders", 4)?;
    let registry = Registry::start(dir.path())?;
    let (home_a, home_b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&home_a)?;
    std::fs::create_dir_all(&home_b)?;
    let mut a = start_order_summary_worker(&home_a, &broker, &registry)?;
    let first = produce_orders(dir.path(), &broker, &registry, "first", 300, 73)?;
    wait_for_oracle(&mut a, &first, Duration::from_secs(120))?;
    let everything: BTreeSet<String> = (0..4).map(|p| p.to_string()).collect();
    wait_until("A to export every partition", Duration::from_secs(30), || {
        lag_partitions(&a, "order_summary") == everything
    })?;

    // B joins: the partitions are split, and so are the lag series.
    let b = start_order_summary_worker(&home_b, &broker, &registry)?;
    let mut seen = (BTreeSet::new(), BTreeSet::new());
    wait_until(
        "the lag series to be split between A and B",
        Duration::from_secs(90),
        || {
            seen = (
                lag_partitions(&a, "order_summary"),
                lag_partitions(&b, "order_summary"),
            );
            !seen.0.is_empty()
                && !seen.1.is_empty()
                && seen.0.is_disjoint(&seen.1)
                && seen.0.union(&seen.1).cloned().collect::<BTreeSet<_>>() == everything
        },
    )
    .with_context(|| format!("A exports {:?}, B exports {:?}", seen.0, seen.1))?;

    // B leaves: A owns everything again and exports every partition.
    drop(b);
    wait_until(
        "A to export every partition again",
        Duration::from_secs(90),
        || lag_partitions(&a, "order_summary") == everything,
    )?;
    Ok(())
}
