//! Hostile records on the source topic: a 10 MB value, a 1 MB key, a value nested
//! 100,000 levels deep, a string length prefix far beyond the message, a negative
//! array block count. Each gets its projection's policy, nothing panics, and the
//! worker's peak memory stays bounded.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use projector_tests::orders;
use projector_tests::{
    assert_matches, metric_value, produce, repo_root, set_compatibility, wait_applied, wait_for_status,
    worker_config, write_events, Broker, Registry, Worker,
};
use serde_json::{json, Value};

const TOKEN: &str = "hostile-admin-token";
/// Peak resident memory allowed for the worker. It holds the 10 MB value a few
/// times over (librdkafka's fetch buffer, the message, the dead-letter attempt);
/// honouring a hostile length prefix or block count would take gigabytes.
const PEAK_RSS_LIMIT_BYTES: u64 = 200 * 1024 * 1024;

/// Avro's zig-zag varint encoding of a long.
fn avro_long(n: i64) -> String {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    let mut hex = String::new();
    loop {
        let byte = (z & 0x7f) as u8;
        z >>= 7;
        if z == 0 {
            hex.push_str(&format!("{byte:02x}"));
            return hex;
        }
        hex.push_str(&format!("{:02x}", byte | 0x80));
    }
}

fn avro_string(s: &str) -> String {
    let bytes: String = s.bytes().map(|b| format!("{b:02x}")).collect();
    avro_long(s.len() as i64) + &bytes
}

fn placed(id: &str) -> Value {
    json!({"type": "OrderPlaced", "value": {"orderId": id, "customerId": "c", "items": [],
           "totalCents": 100, "currency": "EUR", "placedAt": 1}})
}

fn with(mut base: Value, extra: Value) -> Value {
    for (k, v) in extra.as_object().expect("an object") {
        base[k] = v.clone();
    }
    base
}

/// (poison reason, or None for a valid event; the record for produce.py)
fn hostile_records() -> Vec<(Option<&'static str>, Value)> {
    let recursive = repo_root().join("tests/python/variants/OrderPlaced.recursive.avsc");
    vec![
        (
            None,
            with(placed("hostile-key"), json!({"key": "k".repeat(1024 * 1024)})),
        ),
        (
            Some("unknown_schema"),
            json!({"type": "OrderPlaced", "schema_file": recursive, "value": {"next": null},
                   "body_hex": "02".repeat(100_000) + "00"}),
        ),
        (
            Some("decode_failed"),
            with(
                placed("hostile-length"),
                json!({"body_hex": avro_long(1 << 40) + "6162"}),
            ),
        ),
        (
            Some("decode_failed"),
            with(
                placed("hostile-blocks"),
                json!({"body_hex": avro_string("hostile-blocks") + &avro_string("c")
                    + &avro_long(-1_000_000_000) + &avro_long(8) + "00"}),
            ),
        ),
        (
            Some("bad_frame"),
            with(placed("hostile-huge"), json!({"append_zeros": 10 * 1024 * 1024})),
        ),
    ]
}

fn peak_rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("VmHWM in /proc/<pid>/status")?;
    let kib: u64 = line.split_whitespace().nth(1).context("VmHWM value")?.parse()?;
    Ok(kib * 1024)
}

fn poison_count(worker: &Worker, projection: &str, reason: &str) -> Result<usize> {
    Ok(metric_value(
        &worker.metrics()?,
        "projector_poison_events_total",
        &[("projection", projection), ("reason", reason)],
    )
    .unwrap_or(0.0) as usize)
}

#[test]
fn hostile_records_get_their_policy_without_panics_or_unbounded_memory() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Broker::start(dir.path())?;
    broker.create_topic("orders", 1)?;
    broker.create_topic("orders-dlt", 1)?;
    let registry = Registry::start(dir.path())?;
    set_compatibility(&registry, "NONE")?;

    // Good orders with the hostile records spread through them, the huge value last.
    let good = orders::generate("orders", 40, 9);
    let hostile = hostile_records();
    let spacing = good.lines.len() / (hostile.len() + 1);
    let mut lines = Vec::new();
    let mut valid = Vec::new();
    let mut poison_offsets = Vec::new();
    let mut next_hostile = hostile.into_iter();
    for (i, line) in good.lines.iter().enumerate() {
        lines.push(line.clone());
        valid.push(line.clone());
        if i % spacing == spacing - 1 {
            if let Some((reason, mut record)) = next_hostile.next() {
                record["topic"] = json!("orders");
                record
                    .as_object_mut()
                    .expect("an object")
                    .entry("key")
                    .or_insert(json!("hostile"));
                match reason {
                    Some(reason) => poison_offsets.push((lines.len() as i64, reason)),
                    None => valid.push(record.clone()),
                }
                lines.push(record);
            }
        }
    }
    ensure!(
        next_hostile.next().is_none(),
        "every hostile record is in the log"
    );
    produce(
        &broker,
        &registry,
        &write_events(dir.path(), "events.jsonl", &lines)?,
    )?;

    let projections = r#"
[[projections]]
name = "skips"
kind = "order_summary"
topics = ["orders"]
on_poison = "skip"

[[projections]]
name = "dead_letters"
kind = "order_summary"
topics = ["orders"]
on_poison = "dead_letter"
dead_letter_topic = "orders-dlt"
"#;
    let config = worker_config(&broker, &registry, &dir.path().join("data"), projections)
        .replace("[http]\n", &format!("[http]\nadmin_token = \"{TOKEN}\"\n"));
    let mut worker = Worker::start(dir.path(), &config)?;
    let oracle = orders::oracle(&valid);

    // Skip: every record passes, each poison one counted under its reason.
    wait_applied(&mut worker, "skips", lines.len(), Duration::from_secs(120))?;
    assert_matches(&worker, "skips", &oracle)?;
    for reason in ["unknown_schema", "decode_failed", "bad_frame"] {
        let want = poison_offsets.iter().filter(|(_, r)| *r == reason).count();
        let got = poison_count(&worker, "skips", reason)?;
        ensure!(
            got == want,
            "skips: {got} poison events of reason {reason}, want {want}"
        );
    }

    // Dead letter: the three small poison records are dead-lettered; the 10 MB one
    // is larger than the producer may send, so the projection stops at it, saying
    // why, instead of retrying forever.
    let (huge_offset, _) = *poison_offsets.last().expect("the huge value");
    let status = wait_for_status(
        &worker,
        "dead_letters",
        "dead_letters to stop at the 10 MB value",
        |s| s["state"] == "poisoned",
    )?;
    ensure!(
        status["offset"] == huge_offset
            && status["reason"] == "bad_frame"
            && status["error"]
                .as_str()
                .is_some_and(|e| e.contains("max_event_bytes") && e.contains("dead letter was refused")),
        "stopped at the huge value with both causes named: {status}"
    );
    let dead_letters = metric_value(
        &worker.metrics()?,
        "projector_dead_letters_total",
        &[("projection", "dead_letters")],
    );
    ensure!(
        dead_letters == Some((poison_offsets.len() - 1) as f64),
        "dead letters acknowledged: {dead_letters:?}"
    );
    let (skipped, body) = worker.post("/projections/dead_letters/skip", Some(TOKEN))?;
    ensure!(skipped == 202, "skip: {skipped} {body}");
    wait_applied(&mut worker, "dead_letters", lines.len(), Duration::from_secs(60))?;
    assert_matches(&worker, "dead_letters", &oracle)?;

    worker.service.check_alive()?;
    let log = worker.service.log();
    ensure!(!log.contains("panicked"), "no panic in the worker log");
    let peak = peak_rss_bytes(worker.service.pid())?;
    println!("worker peak RSS: {} MB", peak / (1024 * 1024));
    ensure!(
        peak < PEAK_RSS_LIMIT_BYTES,
        "peak RSS {} MB exceeds {} MB",
        peak / (1024 * 1024),
        PEAK_RSS_LIMIT_BYTES / (1024 * 1024)
    );
    Ok(())
}
