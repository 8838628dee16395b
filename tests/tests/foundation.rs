//! The foundation on real parts: Tansu, `projector registry`, Confluent's Python
//! producer and `projector run` as processes. State over HTTP is compared with an
//! independent oracle fold on every key.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use projector_tests::orders;
use projector_tests::{
    order_summary_projections, produce, produce_command, start_order_summary_worker, wait_for_oracle,
    wait_until, worker_config, write_events, Broker, Registry, Service, Worker,
};
use rand::Rng;
use serde_json::{json, Value};

#[test]
fn twenty_thousand_events_fold_to_the_oracle_state() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Broker::start(dir.path())?;
    broker.create_topic("orders", 4)?;
    let registry = Registry::start(dir.path())?;
    let mut worker = start_order_summary_worker(dir.path(), &broker, &registry)?;

    let stream = orders::generate("orders", 5_000, 2);
    assert!(stream.lines.len() >= 20_000);
    let events = write_events(dir.path(), "events.jsonl", &stream.lines)?;
    produce(&broker, &registry, &events)?;

    wait_for_oracle(&mut worker, &stream, Duration::from_secs(180))?;

    let (status, listing) = worker.get("/projections")?;
    assert_eq!(status, 200);
    let offsets = &listing["projections"][0]["offsets"];
    assert_eq!(
        offsets.as_object().map(|o| o.len()),
        Some(4),
        "one offset per partition: {listing}"
    );
    Ok(())
}

#[test]
fn sigkill_while_events_flow_loses_nothing_and_applies_nothing_twice() -> Result<()> {
    let mut rng = projector_tests::seeded_rng("crash test");

    let dir = tempfile::tempdir()?;
    let broker = Broker::start(dir.path())?;
    broker.create_topic("orders", 4)?;
    let registry = Registry::start(dir.path())?;
    let mut worker = start_order_summary_worker(dir.path(), &broker, &registry)?;

    let stream = orders::generate("orders", 5_000, rng.random_range(0..10_000));
    let events = write_events(dir.path(), "events.jsonl", &stream.lines)?;
    // About 28 s of traffic at 700 events/s. Each kill waits until the worker is
    // folding (its committed count passed a random mark), so it lands mid-stream.
    let mut producer = Service::start(
        "producer",
        produce_command(&broker, &registry, &events, 700),
        &dir.path().join("producer.log"),
    )?;
    let started = Instant::now();
    for mark in [2_000, 7_000, 12_000] {
        let mark = mark + rng.random_range(0..1_500);
        let mut applied = 0;
        wait_until(
            &format!("{mark} events applied before a kill"),
            Duration::from_secs(90),
            || {
                applied = worker.applied_offsets("order_summary").unwrap_or(applied);
                applied >= mark
            },
        )?;
        std::thread::sleep(Duration::from_millis(rng.random_range(0..300)));
        println!(
            "SIGKILL at {:.1}s, {applied}+ events applied",
            started.elapsed().as_secs_f64()
        );
        worker.restart(dir.path())?;
    }
    ensure!(
        producer.check_alive().is_ok(),
        "the producer was still writing at the last kill"
    );
    let status = producer.wait_exit(Duration::from_secs(120))?;
    ensure!(status.success(), "producer failed: {}", producer.log());
    wait_for_oracle(&mut worker, &stream, Duration::from_secs(180))
}

#[test]
fn bad_messages_stop_the_projection_at_their_offset_and_reads_keep_serving() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Broker::start(dir.path())?;
    let registry = Registry::start(dir.path())?;
    let cases = [
        (
            "no_magic_byte",
            "bad_frame",
            json!({"raw_hex": "7b226f72646572223a317d"}),
        ),
        (
            "unknown_schema_id",
            "unknown_schema_id",
            json!({"type": "OrderPlaced", "schema_id": 987_654}),
        ),
        (
            "truncated_avro",
            "decode_failed",
            json!({"type": "OrderPlaced", "truncate": 4}),
        ),
    ];
    let mut lines = Vec::new();
    for (topic, _, bad) in &cases {
        broker.create_topic(topic, 1)?;
        let placed = |id: &str| {
            json!({"topic": topic, "key": id, "type": "OrderPlaced", "value": {
                "orderId": id, "customerId": "c", "items": [], "totalCents": 100,
                "currency": "EUR", "placedAt": 1}})
        };
        lines.push(placed("before-1"));
        lines.push(placed("before-2"));
        let mut bad_line = placed("bad");
        for (k, v) in bad.as_object().unwrap() {
            bad_line[k] = v.clone();
        }
        lines.push(bad_line);
        lines.push(placed("after"));
    }
    let events = write_events(dir.path(), "events.jsonl", &lines)?;
    produce(&broker, &registry, &events)?;

    let projections: Vec<(&str, &str)> = cases.iter().map(|(topic, _, _)| (*topic, *topic)).collect();
    let config = worker_config(
        &broker,
        &registry,
        &dir.path().join("data"),
        &order_summary_projections(&projections),
    );
    let mut worker = Worker::start(dir.path(), &config)?;

    for (topic, reason, _) in &cases {
        let mut description = Value::Null;
        wait_until(
            &format!("{topic} to stop on its bad message"),
            Duration::from_secs(90),
            || {
                description = worker.projection(topic).unwrap_or(Value::Null);
                description["status"]["state"] == "poisoned"
            },
        )
        .with_context(|| format!("last status {description}; log:\n{}", worker.service.log()))?;
        let status = &description["status"];
        assert_eq!(status["reason"], *reason, "{description}");
        assert_eq!(status["topic"], *topic);
        assert_eq!(status["partition"], 0);
        assert_eq!(status["offset"], 2, "stopped at the bad message: {description}");
        assert_eq!(
            description["offsets"][format!("{topic}/0")],
            2,
            "nothing past it was committed"
        );

        let log = worker.service.log();
        let line = log
            .lines()
            .find(|l| l.contains("poison event") && l.contains(&format!("{topic}/0 offset 2")))
            .with_context(|| format!("no log line names {topic}/0 offset 2:\n{log}"))?;
        assert!(line.contains(reason), "the log line names the reason: {line}");

        let (status, before) = worker.get(&format!("/projections/{topic}/state/before-2"))?;
        assert_eq!(
            (status, &before["status"]),
            (200, &json!("placed")),
            "reads keep serving"
        );
        let (status, _) = worker.get(&format!("/projections/{topic}/state/after"))?;
        assert_eq!(status, 404, "the event after the bad one was not applied");
    }
    worker.service.check_alive()?;
    // A restart stops again at the same place: the bad event is never skipped.
    worker.restart(dir.path())?;
    wait_until(
        "the restarted worker to stop at the same event",
        Duration::from_secs(90),
        || {
            worker
                .projection("truncated_avro")
                .map(|d| d["status"]["state"] == "poisoned" && d["status"]["offset"] == 2)
                .unwrap_or(false)
        },
    )?;
    Ok(())
}
