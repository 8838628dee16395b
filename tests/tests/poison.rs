//! A corpus of bad messages through each poison policy, on real parts: `skip` and
//! `dead_letter` fold every good event (state == oracle) and count each bad one by
//! reason; the dead-letter topic holds the original bytes and the reason headers;
//! `stop` halts at each bad one until an operator skips it (admin token required).

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use projector_tests::orders::{self, OrderStream};
use projector_tests::{
    metric_value, produce_command, python, repo_root, run_to_completion, set_compatibility, wait_applied,
    wait_until, without_as_of, worker_config, write_events, Broker, Registry, Worker,
};
use serde_json::{json, Value};

const TOKEN: &str = "test-admin-token";

/// (reason the engine must give, how produce.py makes the bad message)
fn corpus() -> Vec<(&'static str, Value)> {
    let variants = repo_root().join("tests/python/variants");
    let placed = |id: &str| {
        json!({"type": "OrderPlaced", "value": {"orderId": id, "customerId": "c", "items": [],
               "totalCents": 100, "currency": "EUR", "placedAt": 1}})
    };
    let with = |mut base: Value, extra: Value| {
        for (k, v) in extra.as_object().unwrap() {
            base[k] = v.clone();
        }
        base
    };
    vec![
        (
            "bad_frame",
            json!({"raw_hex": "7b226f72646572223a317d", "headers": {"trace-id": "t-1"}}),
        ),
        ("bad_frame", json!({"raw_hex": ""})),
        ("bad_frame", json!({"null_value": true})),
        (
            "bad_frame",
            with(
                placed("bad-huge"),
                json!({"value": {"orderId": "bad-huge", "customerId": "x".repeat(5000),
            "items": [], "totalCents": 1, "currency": "EUR", "placedAt": 1}}),
            ),
        ),
        (
            "unknown_schema_id",
            with(placed("bad-id"), json!({"schema_id": 987_654})),
        ),
        (
            "unknown_schema",
            json!({"type": "OrderPlaced", "schema_file": variants.join("OrderPlaced.stranger.avsc"),
            "value": {"orderId": "bad-stranger", "weird": 3}}),
        ),
        (
            "decode_failed",
            with(placed("bad-truncated"), json!({"truncate": 4})),
        ),
        (
            "decode_failed",
            with(placed("bad-trailing"), json!({"append_hex": "00ff00"})),
        ),
        (
            "decode_failed",
            with(placed("bad-utf8"), json!({"corrupt": "EUR"})),
        ),
        (
            "decode_failed",
            with(
                placed("bad-other-type"),
                json!({"schema_id_of": "PaymentCharged"}),
            ),
        ),
        (
            "upcast_failed",
            json!({"type": "OrderPlaced", "version": 1, "value": {"orderId": "bad-upcast",
            "customerId": "c", "items": [], "total": 1e300, "placedAt": 1}}),
        ),
        (
            "fold_failed",
            with(
                placed("bad-negative"),
                json!({"value": {"orderId": "bad-negative", "customerId": "c",
            "items": [], "totalCents": -5, "currency": "EUR", "placedAt": 1}}),
            ),
        ),
    ]
}

struct Setup {
    _dir: tempfile::TempDir,
    _broker: Broker,
    _registry: Registry,
    worker: Worker,
    good: OrderStream,
    /// (offset, reason, produced record) of each bad message, in log order.
    bad: Vec<(i64, &'static str, Value)>,
    total: usize,
    brokers: String,
}

/// One partition: good order events with the corpus spread through them; three
/// projections over it, one per policy.
fn setup() -> Result<Setup> {
    let dir = tempfile::tempdir()?;
    let broker = Broker::start(dir.path())?;
    broker.create_topic("orders", 1)?;
    broker.create_topic("orders-dlt", 1)?;
    let registry = Registry::start(dir.path())?;
    set_compatibility(&registry, "NONE")?;

    let good = orders::generate("orders", 60, 3);
    let corpus = corpus();
    let mut lines = Vec::new();
    let mut reasons = Vec::new();
    let spacing = good.lines.len() / (corpus.len() + 1);
    let mut bad = corpus.into_iter();
    for (i, line) in good.lines.iter().enumerate() {
        lines.push(line.clone());
        if i % spacing == spacing - 1 {
            if let Some((reason, mut record)) = bad.next() {
                record["topic"] = json!("orders");
                record["key"] = json!(format!("bad-key-{}", lines.len()));
                reasons.push((lines.len() as i64, reason));
                lines.push(record);
            }
        }
    }
    ensure!(
        bad.next().is_none() && reasons.len() == 12,
        "the whole corpus is in the log"
    );
    // PaymentCharged must be serialized before a message borrows its schema id.
    ensure!(
        lines.iter().position(|l| l["type"] == "PaymentCharged")
            < reasons.iter().map(|r| r.0 as usize).nth(9)
    );

    let record_file = dir.path().join("produced.jsonl");
    let mut command = produce_command(
        &broker,
        &registry,
        &write_events(dir.path(), "events.jsonl", &lines)?,
        0,
    );
    command.arg("--record").arg(&record_file);
    run_to_completion(command)?;
    let produced: Vec<Value> = std::fs::read_to_string(&record_file)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let bad = reasons
        .into_iter()
        .map(|(offset, reason)| (offset, reason, produced[offset as usize].clone()))
        .collect();

    let projections = r#"
[[projections]]
name = "stops"
kind = "order_summary"
topics = ["orders"]
max_event_bytes = 2048

[[projections]]
name = "skips"
kind = "order_summary"
topics = ["orders"]
on_poison = "skip"
max_event_bytes = 2048

[[projections]]
name = "dead_letters"
kind = "order_summary"
topics = ["orders"]
on_poison = "dead_letter"
dead_letter_topic = "orders-dlt"
max_event_bytes = 2048
"#;
    let config = worker_config(&broker, &registry, &dir.path().join("data"), projections)
        .replace("[http]\n", &format!("[http]\nadmin_token = \"{TOKEN}\"\n"));
    let worker = Worker::start(dir.path(), &config)?;
    Ok(Setup {
        brokers: broker.address(),
        _dir: dir,
        _broker: broker,
        _registry: registry,
        worker,
        good,
        bad,
        total: lines.len(),
    })
}

fn poison_count(metrics: &str, projection: &str, reason: &str) -> usize {
    metric_value(
        metrics,
        "projector_poison_events_total",
        &[("projection", projection), ("reason", reason)],
    )
    .unwrap_or(0.0) as usize
}

fn expected_count(setup: &Setup, reason: &str) -> usize {
    setup.bad.iter().filter(|(_, r, _)| *r == reason).count()
}

/// State of `projection` equals the oracle over the good events alone.
fn assert_good_state(worker: &Worker, projection: &str, good: &OrderStream) -> Result<()> {
    let expected = orders::oracle(&good.lines);
    for (order_id, want) in &expected {
        let (status, got) = worker.get(&format!("/projections/{projection}/state/{order_id}"))?;
        let got = without_as_of(got)?;
        ensure!(
            status == 200 && &got == want,
            "{projection} {order_id}: got {status} {got}, want {want}"
        );
    }
    let (status, _) = worker.get(&format!("/projections/{projection}/state/bad-id"))?;
    ensure!(status == 404, "no bad event was folded");
    Ok(())
}

#[test]
fn every_policy_handles_the_whole_corpus() -> Result<()> {
    let mut setup = setup()?;
    let reasons = [
        "bad_frame",
        "unknown_schema_id",
        "unknown_schema",
        "decode_failed",
        "upcast_failed",
        "fold_failed",
    ];

    // skip: everything good is folded, every bad message counted by reason.
    wait_applied(&mut setup.worker, "skips", setup.total, Duration::from_secs(90))?;
    assert_good_state(&setup.worker, "skips", &setup.good)?;
    let metrics = setup.worker.metrics()?;
    for reason in reasons {
        assert_eq!(
            poison_count(&metrics, "skips", reason),
            expected_count(&setup, reason),
            "skips/{reason}"
        );
    }

    // dead_letter: the same, and the dead-letter topic holds each bad message as it
    // was produced, with the reason and source in headers.
    wait_applied(
        &mut setup.worker,
        "dead_letters",
        setup.total,
        Duration::from_secs(90),
    )?;
    assert_good_state(&setup.worker, "dead_letters", &setup.good)?;
    let metrics = setup.worker.metrics()?;
    assert_eq!(
        metric_value(
            &metrics,
            "projector_dead_letters_total",
            &[("projection", "dead_letters")]
        ),
        Some(setup.bad.len() as f64)
    );
    let output = std::process::Command::new(python())
        .arg(repo_root().join("tests/python/consume.py"))
        .args([
            &setup.brokers,
            "orders-dlt",
            "--count",
            &setup.bad.len().to_string(),
        ])
        .output()?;
    ensure!(
        output.status.success(),
        "consume.py: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let letters: Vec<Value> = String::from_utf8(output.stdout)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(letters.len(), setup.bad.len(), "one dead letter per bad message");
    for ((offset, reason, produced), letter) in setup.bad.iter().zip(&letters) {
        assert_eq!(letter["key_hex"], produced["key_hex"], "key of offset {offset}");
        assert_eq!(
            letter["value_hex"], produced["value_hex"],
            "value of offset {offset}"
        );
        let headers: Vec<(String, String)> = letter["headers"]
            .as_array()
            .context("headers")?
            .iter()
            .map(|h| {
                let bytes = hex(h[1].as_str().unwrap_or_default());
                (
                    h[0].as_str().unwrap_or_default().to_owned(),
                    String::from_utf8_lossy(&bytes).into_owned(),
                )
            })
            .collect();
        let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        assert_eq!(
            header("projector.reason"),
            Some(*reason),
            "offset {offset}: {headers:?}"
        );
        assert_eq!(header("projector.source.topic"), Some("orders"));
        assert_eq!(header("projector.source.partition"), Some("0"));
        assert_eq!(
            header("projector.source.offset"),
            Some(offset.to_string().as_str())
        );
        assert_eq!(header("projector.projection"), Some("dead_letters"));
        assert!(header("projector.error").is_some_and(|e| !e.is_empty()));
        for original in produced["headers"].as_array().context("produced headers")? {
            let value = String::from_utf8_lossy(&hex(original[1].as_str().unwrap_or_default())).into_owned();
            assert_eq!(
                header(original[0].as_str().unwrap_or_default()),
                Some(value.as_str()),
                "original headers kept"
            );
        }
    }

    // stop: halts at each bad message in turn; resume retries it (and stops again);
    // skip needs the admin token and passes exactly that one event.
    let worker = &setup.worker;
    let (status, _) = worker.post("/projections/stops/skip", None)?;
    assert_eq!(status, 401, "no token");
    let (status, _) = worker.post("/projections/stops/skip", Some("wrong"))?;
    assert_eq!(status, 401, "wrong token");
    for (index, (offset, reason, _)) in setup.bad.iter().enumerate() {
        let mut description = Value::Null;
        wait_until(
            &format!("stops to halt at offset {offset}"),
            Duration::from_secs(60),
            || {
                description = worker.projection("stops").unwrap_or(Value::Null);
                description["status"]["state"] == "poisoned" && description["status"]["offset"] == *offset
            },
        )
        .with_context(|| format!("last: {description}"))?;
        assert_eq!(description["status"]["reason"], *reason, "{description}");
        assert_eq!(
            description["offsets"]["orders/0"], *offset,
            "committed up to the bad message"
        );
        if index == 0 {
            let (status, _) = worker.post("/projections/stops/resume", Some(TOKEN))?;
            assert_eq!(status, 202);
            wait_until(
                "the resumed projection to stop at the same event",
                Duration::from_secs(60),
                || {
                    let d = worker.projection("stops").unwrap_or(Value::Null);
                    d["status"]["state"] == "poisoned" && d["status"]["offset"] == *offset
                },
            )?;
        }
        let (status, body) = worker.post("/projections/stops/skip", Some(TOKEN))?;
        assert_eq!(
            (status, &body["skipping"]["offset"]),
            (202, &json!(offset)),
            "{body}"
        );
    }
    wait_applied(&mut setup.worker, "stops", setup.total, Duration::from_secs(60))?;
    assert_good_state(&setup.worker, "stops", &setup.good)?;
    let metrics = setup.worker.metrics()?;
    assert_eq!(
        metric_value(
            &metrics,
            "projector_operator_skips_total",
            &[("projection", "stops")]
        ),
        Some(setup.bad.len() as f64)
    );
    let (status, _) = setup.worker.post("/projections/stops/skip", Some(TOKEN))?;
    assert_eq!(status, 409, "nothing to skip once running");
    Ok(())
}

fn hex(text: &str) -> Vec<u8> {
    (0..text.len() / 2)
        .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).unwrap_or(0))
        .collect()
}

#[test]
fn admin_endpoints_are_disabled_without_a_token() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Broker::start(dir.path())?;
    broker.create_topic("orders", 1)?;
    let registry = Registry::start(dir.path())?;
    let config = worker_config(
        &broker,
        &registry,
        &dir.path().join("data"),
        "[[projections]]\nname = \"p\"\nkind = \"order_summary\"\ntopics = [\"orders\"]\n",
    );
    let worker = Worker::start(dir.path(), &config)?;
    let (status, body) = worker.post("/projections/p/skip", Some("anything"))?;
    assert_eq!(status, 403);
    assert!(
        body["error"].as_str().unwrap_or_default().contains("admin_token"),
        "{body}"
    );
    Ok(())
}
