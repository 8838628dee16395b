//! Schema evolution on real parts: a log holding v1, v2 and v3 events (and v1
//! events written with schemas that differ only in docs or field order) folds to the
//! state of an oracle that applies the upcast rules itself; a registry that is down
//! when a schema id first appears is waited for, and nothing is skipped.

use std::time::Duration;

use anyhow::{ensure, Result};
use projector_tests::orders;
use projector_tests::{
    free_port, metric_value, produce, produce_command, produce_orders, set_compatibility,
    start_order_summary_worker, wait_applied, wait_for_oracle, wait_until, write_events, Broker, Registry,
    Service,
};

#[test]
fn mixed_schema_versions_fold_to_the_upcasting_oracle() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Broker::start(dir.path())?;
    broker.create_topic("orders", 4)?;
    let registry = Registry::start(dir.path())?;
    // Old and new versions are registered in whatever order they first appear.
    set_compatibility(&registry, "NONE")?;
    let mut stream = orders::generate("orders", 2_000, 11);
    orders::mix_versions(&mut stream, 11);
    let versions: Vec<_> = stream
        .lines
        .iter()
        .filter_map(|l| l["version"].as_u64())
        .collect();
    ensure!(
        versions.contains(&1) && versions.contains(&2),
        "the stream mixes versions"
    );
    let events = write_events(dir.path(), "events.jsonl", &stream.lines)?;
    produce(&broker, &registry, &events)?;

    let mut worker = start_order_summary_worker(dir.path(), &broker, &registry)?;
    wait_for_oracle(&mut worker, &stream, Duration::from_secs(120))?;

    let metrics = worker.metrics()?;
    let upcasts = |from: &str, to: &str, event: &str| {
        metric_value(
            &metrics,
            "projector_upcasts_total",
            &[("event", event), ("from_version", from), ("to_version", to)],
        )
        .unwrap_or(0.0)
    };
    let v1 = stream
        .lines
        .iter()
        .filter(|l| l["type"] == "OrderPlaced" && l["version"] == 1)
        .count();
    assert_eq!(
        upcasts("1", "2", "shop.orders.OrderPlaced") as usize,
        v1,
        "every v1 went through v1->v2"
    );
    assert!(
        upcasts("2", "3", "shop.orders.OrderPlaced") as usize > v1,
        "v1 and v2 went through v2->v3"
    );
    assert!(
        upcasts("1", "2", "shop.orders.OrderShipped") > 0.0,
        "the Rust upcaster ran"
    );
    Ok(())
}

#[test]
fn registry_outage_when_a_new_schema_id_appears_is_waited_out() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Broker::start(dir.path())?;
    broker.create_topic("orders", 2)?;
    let registry_port = free_port();
    let registry_data = dir.path().join("registry-data");
    let mut registry = Registry::start_at(dir.path(), registry_port, Some(&registry_data))?;
    set_compatibility(&registry, "NONE")?;

    let mut stream = orders::generate("orders", 400, 5);
    orders::mix_versions(&mut stream, 5);
    // Phase 1: only OrderPlaced events, folded while the registry is up.
    let (first, second): (Vec<_>, Vec<_>) = stream
        .lines
        .iter()
        .cloned()
        .partition(|l| l["type"] == "OrderPlaced" && l["version"].is_null());
    produce(
        &broker,
        &registry,
        &write_events(dir.path(), "first.jsonl", &first)?,
    )?;
    let mut worker = start_order_summary_worker(dir.path(), &broker, &registry)?;
    wait_applied(&mut worker, "order_summary", first.len(), Duration::from_secs(90))?;

    // Phase 2: the rest is serialized (registering new schemas), the registry goes
    // down, and only then do the events reach Kafka: their schema ids are new to
    // the worker and cannot be fetched.
    let go = dir.path().join("go");
    let mut command = produce_command(
        &broker,
        &registry,
        &write_events(dir.path(), "second.jsonl", &second)?,
        0,
    );
    command.arg("--hold-until").arg(&go);
    let mut producer = Service::start("producer", command, &dir.path().join("producer.log"))?;
    wait_until("the producer to serialize", Duration::from_secs(60), || {
        producer.log().contains("serialized")
    })?;
    registry.service.kill();
    std::fs::write(&go, "")?;
    producer.wait_exit(Duration::from_secs(60))?;

    wait_until("the worker to report retries", Duration::from_secs(60), || {
        worker
            .service
            .log()
            .contains("schema registry unavailable; retrying")
    })?;
    std::thread::sleep(Duration::from_secs(2));
    let stalled = worker.applied_offsets("order_summary")?;
    ensure!(
        stalled < stream.lines.len() as i64,
        "nothing past the first unknown schema id is applied while the registry is down ({stalled})"
    );
    let errors = metric_value(
        &worker.metrics()?,
        "projector_schema_registry_requests_total",
        &[("outcome", "error")],
    );
    ensure!(
        errors.unwrap_or(0.0) >= 1.0,
        "failed registry requests are counted"
    );

    registry = Registry::start_at(dir.path(), registry_port, Some(&registry_data))?;
    wait_for_oracle(&mut worker, &stream, Duration::from_secs(120))?;
    drop(registry);
    Ok(())
}

#[test]
fn registry_down_at_start_up_is_waited_out() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Broker::start(dir.path())?;
    broker.create_topic("orders", 2)?;
    let registry_port = free_port();
    let registry_data = dir.path().join("registry-data");
    let mut registry = Registry::start_at(dir.path(), registry_port, Some(&registry_data))?;
    let stream = produce_orders(dir.path(), &broker, &registry, "events", 200, 6)?;
    // The worker starts while the registry is down: it knows no schema id yet.
    registry.service.kill();
    let mut worker = start_order_summary_worker(dir.path(), &broker, &registry)?;
    wait_until("the worker to report retries", Duration::from_secs(60), || {
        worker
            .service
            .log()
            .contains("schema registry unavailable; retrying")
    })?;
    worker.service.check_alive()?;
    let (health, _) = worker.get("/healthz")?;
    ensure!(health == 200, "the worker serves while it waits: {health}");
    ensure!(
        worker.applied_offsets("order_summary")? == 0,
        "nothing is applied (or skipped) while no schema can be fetched"
    );
    registry = Registry::start_at(dir.path(), registry_port, Some(&registry_data))?;
    wait_for_oracle(&mut worker, &stream, Duration::from_secs(120))?;
    drop(registry);
    Ok(())
}
