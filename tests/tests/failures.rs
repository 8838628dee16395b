//! Failures never look healthy (DESIGN.md invariant 6), on real parts: a fold
//! that panics is a poison event (status, `/readyz`, `projector_projection_up`,
//! then `resume` and `skip`), an overflowing deposit is `fold_failed` with the
//! balance unchanged, and a damaged offset row stops the projection naming the row
//! instead of refolding the partition from offset 0.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use projector_tests::orders::{self, concat};
use projector_tests::{
    assert_state_matches_oracle, metric_value, produce, produce_orders, start_order_summary_worker,
    wait_applied, wait_for_oracle, wait_for_status, wait_until, worker_config, write_events, Broker,
    Registry, Worker,
};
use serde_json::{json, Value};

const TOKEN: &str = "test-admin-token";

fn with_admin_token(config: String) -> String {
    config.replace("[http]\n", &format!("[http]\nadmin_token = \"{TOKEN}\"\n"))
}

fn poisoned_with(status: &Value, reason: &str, needle: &str) -> bool {
    status["state"] == "poisoned"
        && status["reason"] == reason
        && status["error"].as_str().is_some_and(|e| e.contains(needle))
}

/// `/readyz` is 503 naming `projection`, and `projector_projection_up` is 0.
fn assert_not_healthy(worker: &Worker, projection: &str) -> Result<()> {
    let (status, body) = worker.get("/readyz")?;
    ensure!(
        status == 503 && body.to_string().contains(projection),
        "/readyz names {projection}: {status} {body}"
    );
    let up = metric_value(
        &worker.metrics()?,
        "projector_projection_up",
        &[("projection", projection)],
    );
    ensure!(up == Some(0.0), "projector_projection_up is 0, got {up:?}");
    Ok(())
}

fn poison_count(worker: &Worker, reason: &str) -> Result<f64> {
    Ok(metric_value(
        &worker.metrics()?,
        "projector_poison_events_total",
        &[("projection", "order_summary"), ("reason", reason)],
    )
    .unwrap_or(0.0))
}

#[test]
fn a_panicking_fold_is_a_poison_event_not_a_silent_death() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Broker::start(dir.path())?;
    broker.create_topic("orders", 4)?;
    let registry = Registry::start(dir.path())?;
    let projection =
        "[[projections]]\nname = \"order_summary\"\nkind = \"panic_on_marker\"\ntopics = [\"orders\"]\n";
    let config = with_admin_token(worker_config(
        &broker,
        &registry,
        &dir.path().join("data"),
        projection,
    ));
    let mut worker = Worker::start_test_worker(dir.path(), &config)?;

    // Orders, then one that makes the fold panic, then more orders.
    let before = orders::generate("orders", 150, 61);
    let after = orders::generate("orders", 150, 62);
    let marker = json!({"topic": "orders", "key": "panic-1", "type": "OrderPlaced", "value": {
        "orderId": "panic-1", "customerId": "c", "items": [], "totalCents": 5, "currency": "EUR",
        "placedAt": 1}});
    let lines = [before.lines.clone(), vec![marker], after.lines.clone()].concat();
    produce(
        &broker,
        &registry,
        &write_events(dir.path(), "events.jsonl", &lines)?,
    )?;

    let status = wait_for_status(
        &worker,
        "order_summary",
        "the panic to poison the projection",
        |s| poisoned_with(s, "fold_failed", "panicked: marker event"),
    )?;
    assert_not_healthy(&worker, "order_summary")?;
    ensure!(
        poison_count(&worker, "fold_failed")? == 1.0,
        "counted once as fold_failed"
    );
    // The fold changed a key before it panicked: that change was never committed.
    let (scratch, body) = worker.get("/projections/order_summary/state/~scratch")?;
    ensure!(
        scratch == 404,
        "a panicked fold's change is dropped: {scratch} {body}"
    );

    // `resume` retries the event: it panics again and stops the projection again.
    let (resumed, body) = worker.post("/projections/order_summary/resume", Some(TOKEN))?;
    ensure!(resumed == 202, "resume: {resumed} {body}");
    wait_until(
        "the retried event to panic again",
        Duration::from_secs(60),
        || poison_count(&worker, "fold_failed").is_ok_and(|n| n == 2.0),
    )?;
    let again = wait_for_status(&worker, "order_summary", "poisoned again", |s| {
        poisoned_with(s, "fold_failed", "panicked")
    })?;
    ensure!(
        again["offset"] == status["offset"] && again["partition"] == status["partition"],
        "the same event: {again} vs {status}"
    );
    assert_not_healthy(&worker, "order_summary")?;

    // `skip` moves past exactly that event; every other event is folded.
    let (skipped, body) = worker.post("/projections/order_summary/skip", Some(TOKEN))?;
    ensure!(skipped == 202, "skip: {skipped} {body}");
    wait_applied(
        &mut worker,
        "order_summary",
        lines.len(),
        Duration::from_secs(120),
    )?;
    let mut expected = concat(&before, &after);
    expected.ghosts.push("panic-1".into());
    assert_state_matches_oracle(&worker, &expected)?;
    wait_until("/readyz to recover", Duration::from_secs(30), || {
        worker.get("/readyz").is_ok_and(|(s, _)| s == 200)
    })?;
    let up = metric_value(
        &worker.metrics()?,
        "projector_projection_up",
        &[("projection", "order_summary")],
    );
    ensure!(up == Some(1.0), "up again after the skip: {up:?}");
    Ok(())
}

#[test]
fn an_overflowing_deposit_is_fold_failed_and_leaves_the_balance() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Broker::start(dir.path())?;
    broker.create_topic("accounts", 2)?;
    let registry = Registry::start(dir.path())?;
    let projection =
        "[[projections]]\nname = \"account_balance\"\nkind = \"account_balance\"\ntopics = [\"accounts\"]\n";
    let mut worker = Worker::start(
        dir.path(),
        &worker_config(&broker, &registry, &dir.path().join("data"), projection),
    )?;
    let event = |kind: &str, value: Value| {
        json!({"topic": "accounts", "key": value["accountId"], "namespace": "bank.accounts",
               "type": kind, "value": value})
    };
    let near_max = i64::MAX - 5;
    let lines = vec![
        event(
            "AccountOpened",
            json!({"accountId": "a1", "owner": "ann", "openedAt": 1}),
        ),
        event(
            "MoneyDeposited",
            json!({"accountId": "a1", "amountCents": near_max, "at": 2}),
        ),
        event(
            "MoneyDeposited",
            json!({"accountId": "a1", "amountCents": 6, "at": 3}),
        ),
    ];
    produce(
        &broker,
        &registry,
        &write_events(dir.path(), "accounts.jsonl", &lines)?,
    )?;
    wait_for_status(
        &worker,
        "account_balance",
        "the overflow to stop the projection",
        |s| poisoned_with(s, "fold_failed", "overflows the balance of a1"),
    )?;
    assert_not_healthy(&worker, "account_balance")?;
    let (status, balance) = worker.get("/projections/account_balance/state/a1")?;
    ensure!(status == 200, "{status} {balance}");
    ensure!(
        balance["balance_cents"].as_i64() == Some(near_max) && balance["deposits"] == 1,
        "the balance is the one before the overflowing deposit: {balance}"
    );
    worker.service.check_alive()?;
    Ok(())
}

/// Writes `bytes` as the stored next offset of `topic/partition` in
/// `column_family` of the RocksDB at `data` (the worker must be stopped); returns
/// what was there.
fn write_offset_row(
    data: &Path,
    column_family: &str,
    topic: &str,
    partition: i32,
    bytes: &[u8],
) -> Result<Option<Vec<u8>>> {
    let options = rocksdb::Options::default();
    let families = rocksdb::DB::list_cf(&options, data)?;
    let db = rocksdb::DB::open_cf(&options, data, &families)?;
    let cf = db
        .cf_handle(column_family)
        .with_context(|| format!("no column family {column_family} in {families:?}"))?;
    // The store's offset row: `o`, the topic with NUL escaped and 0x00 0x00 after
    // it, the partition big-endian (engine/src/store.rs).
    let mut row = vec![b'o'];
    for &byte in topic.as_bytes() {
        row.push(byte);
        if byte == 0 {
            row.push(0xFF);
        }
    }
    row.extend_from_slice(&[0, 0]);
    row.extend_from_slice(&partition.to_be_bytes());
    let before = db.get_cf(&cf, &row)?;
    db.put_cf(&cf, &row, bytes)?;
    db.flush_cf(&cf)?;
    Ok(before)
}

#[test]
fn a_damaged_offset_row_stops_the_projection_naming_the_row() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Broker::start(dir.path())?;
    broker.create_topic("orders", 4)?;
    let registry = Registry::start(dir.path())?;
    let mut worker = start_order_summary_worker(dir.path(), &broker, &registry)?;
    let stream = produce_orders(dir.path(), &broker, &registry, "first", 300, 63)?;
    wait_for_oracle(&mut worker, &stream, Duration::from_secs(120))?;
    worker.service.kill();

    let data = dir.path().join("data");
    let true_offset = write_offset_row(&data, "order_summary@1", "orders", 1, &[1, 2, 3])?;
    ensure!(
        true_offset.as_ref().is_some_and(|b| b.len() == 8),
        "orders/1 had an 8-byte offset row before: {true_offset:?}"
    );
    worker.restart(dir.path())?;
    let status = wait_for_status(
        &worker,
        "order_summary",
        "the damaged row to stop the projection",
        |s| {
            s["state"] == "failed"
                && s["error"].as_str().is_some_and(|e| {
                    e.contains("offset row of orders/1 in column family order_summary@1")
                        && e.contains("3 bytes")
                })
        },
    )?;
    assert_not_healthy(&worker, "order_summary")?;
    let description = worker.projection("order_summary")?;
    ensure!(
        description["store_error"]
            .as_str()
            .is_some_and(|e| e.contains("offset row of orders/1")),
        "the description names the damaged row: {description}"
    );
    // The loop has ended (status `failed`): more events are not folded, least of
    // all orders/1 from offset 0.
    let more = produce_orders(dir.path(), &broker, &registry, "second", 100, 64)?;
    ensure!(
        worker.projection("order_summary")?["status"] == status,
        "still failed"
    );
    worker.service.kill();

    // Repaired (the true offset written back), it folds on from exactly there:
    // a partition refolded from 0 would count its orders' events twice.
    write_offset_row(
        &data,
        "order_summary@1",
        "orders",
        1,
        &true_offset.unwrap_or_default(),
    )?;
    worker.restart(dir.path())?;
    wait_for_oracle(&mut worker, &concat(&stream, &more), Duration::from_secs(120))?;
    Ok(())
}
