//! The event shapes Kafka shops write, produced with Confluent's Python client on
//! the real broker and registry: several event types in one topic as a union
//! schema (inline, and as Confluent schema references) under the default
//! TopicNameStrategy; Avro logical types (decimal, date, time, uuid, bytes) read
//! with their meaning; Avro-encoded keys.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use projector_tests::{
    assert_matches, metric_value, order_summary_projections, orders, python, repo_root, run_to_completion,
    set_compatibility, wait_applied, worker_config, write_events, Broker, Registry, Worker,
};
use rand::Rng;
use serde_json::{json, Value};

/// Runs `tests/python/produce_shapes.py` over `lines`.
fn produce_shapes(
    dir: &Path,
    broker: &Broker,
    registry: &Registry,
    lines: &[Value],
    values: &str,
    schemas: &[(&str, PathBuf)],
    key_schema: Option<&Path>,
) -> Result<()> {
    let events = write_events(dir, &format!("{values}-{}.jsonl", lines.len()), lines)?;
    let mut command = std::process::Command::new(python());
    command
        .arg(repo_root().join("tests/python/produce_shapes.py"))
        .args(["--brokers", &broker.address(), "--registry", &registry.url()])
        .arg("--events")
        .arg(&events)
        .args(["--values", values]);
    for (name, file) in schemas {
        command.arg("--schema").arg(format!("{name}={}", file.display()));
    }
    if let Some(key_schema) = key_schema {
        command.arg("--key-schema").arg(key_schema);
    }
    run_to_completion(command)
}

fn order_schema(file: &str) -> PathBuf {
    repo_root().join("schemas/shop.orders").join(file)
}

/// The demo's five order event types, `OrderPlaced` and `OrderShipped` at the
/// versions given, as `produce_shapes.py --schema` takes them.
fn order_schemas(placed: u32, shipped: u32) -> Vec<(&'static str, PathBuf)> {
    [
        ("shop.orders.OrderPlaced", placed),
        ("shop.orders.PaymentCharged", 1),
        ("shop.orders.OrderShipped", shipped),
        ("shop.orders.OrderDelivered", 1),
        ("shop.orders.OrderCancelled", 1),
    ]
    .into_iter()
    .map(|(name, version)| {
        let short = name.trim_start_matches("shop.orders.");
        (name, order_schema(&format!("{short}.v{version}.avsc")))
    })
    .collect()
}

/// `lines` with every event type's full name, as `produce_shapes.py` takes it.
fn full_names(lines: &mut [Value]) {
    for line in lines {
        let short = line["type"].as_str().unwrap_or_default().to_owned();
        line["type"] = json!(format!("shop.orders.{short}"));
    }
}

/// Rewrites every `OrderPlaced` to v1's shape (the total in euros), as a topic
/// whose union still holds v1 carries it. The oracle reads either shape.
fn placed_as_v1(lines: &mut [Value]) {
    for line in lines {
        if line["type"] == "OrderPlaced" {
            let value = line["value"].as_object_mut().expect("an object");
            let cents = value.remove("totalCents").and_then(|c| c.as_i64()).unwrap_or(0);
            value.remove("currency");
            value.insert("total".into(), json!(cents as f64 / 100.0));
        }
    }
}

#[test]
fn union_schemas_under_the_topic_name_strategy_fold_to_the_oracle() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Broker::start(dir.path())?;
    broker.create_topic("orders-inline", 4)?;
    broker.create_topic("orders-refs", 4)?;
    let registry = Registry::start(dir.path())?;
    set_compatibility(&registry, "NONE")?;

    // Inline: the union holds OrderPlaced v1, an old version, upcast like any event.
    let mut inline = orders::generate("orders-inline", 400, 31).lines;
    placed_as_v1(&mut inline);
    let inline_oracle = orders::oracle(&inline);
    let placed_v1 = inline.iter().filter(|l| l["type"] == "OrderPlaced").count();
    full_names(&mut inline);
    let inline_schemas = order_schemas(1, 2);
    produce_shapes(
        dir.path(),
        &broker,
        &registry,
        &inline,
        "inline",
        &inline_schemas,
        None,
    )?;

    // References: a union of references to each type's own subject; OrderShipped
    // is v1 there (its Rust upcaster runs).
    let mut referenced = orders::generate("orders-refs", 400, 32).lines;
    let referenced_oracle = orders::oracle(&referenced);
    full_names(&mut referenced);
    let referenced_schemas = order_schemas(3, 1);
    produce_shapes(
        dir.path(),
        &broker,
        &registry,
        &referenced,
        "references",
        &referenced_schemas,
        None,
    )?;
    // The registry serves the references the producer registered.
    let (status, latest) = get_json(&format!(
        "{}/subjects/orders-refs-value/versions/latest",
        registry.url()
    ))?;
    ensure!(status == 200, "{status} {latest}");
    ensure!(
        latest["references"].as_array().map(Vec::len) == Some(5),
        "the union's references: {latest}"
    );

    let projections =
        order_summary_projections(&[("inline", "orders-inline"), ("referenced", "orders-refs")]);
    let mut worker = Worker::start(
        dir.path(),
        &worker_config(&broker, &registry, &dir.path().join("data"), &projections),
    )?;
    wait_applied(&mut worker, "inline", inline.len(), Duration::from_secs(120))?;
    wait_applied(
        &mut worker,
        "referenced",
        referenced.len(),
        Duration::from_secs(120),
    )?;
    assert_matches(&worker, "inline", &inline_oracle)?;
    assert_matches(&worker, "referenced", &referenced_oracle)?;

    let metrics = worker.metrics()?;
    let upcasts = |event: &str| {
        metric_value(
            &metrics,
            "projector_upcasts_total",
            &[("event", event), ("from_version", "1"), ("to_version", "2")],
        )
        .unwrap_or(0.0) as usize
    };
    ensure!(
        upcasts("shop.orders.OrderPlaced") == placed_v1,
        "every OrderPlaced of the inline union went through v1->v2"
    );
    let shipped = referenced
        .iter()
        .filter(|l| l["type"] == "shop.orders.OrderShipped")
        .count();
    ensure!(upcasts("shop.orders.OrderShipped") == shipped);
    for name in ["inline", "referenced"] {
        let poison = metric_value(&metrics, "projector_poison_events_total", &[("projection", name)]);
        ensure!(poison.unwrap_or(0.0) == 0.0, "{name}: no poison, got {poison:?}");
    }
    Ok(())
}

/// The repo's schema set plus `bank.ledger.Payment`, which uses every logical type.
fn ledger_schemas(dir: &Path) -> Result<PathBuf> {
    let schemas = dir.join("schemas");
    for namespace in ["shop.orders", "bank.accounts"] {
        let target = schemas.join(namespace);
        std::fs::create_dir_all(&target)?;
        for entry in std::fs::read_dir(repo_root().join("schemas").join(namespace))? {
            let entry = entry?;
            std::fs::copy(entry.path(), target.join(entry.file_name()))?;
        }
    }
    std::fs::create_dir_all(schemas.join("bank.ledger"))?;
    std::fs::write(
        schemas.join("bank.ledger/Payment.v1.avsc"),
        r#"{"type": "record", "name": "Payment", "namespace": "bank.ledger", "fields": [
            {"name": "paymentId", "type": {"type": "string", "logicalType": "uuid"}},
            {"name": "account", "type": "string"},
            {"name": "amount", "type": {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 2}},
            {"name": "paidOn", "type": {"type": "int", "logicalType": "date"}},
            {"name": "cutoff", "type": {"type": "int", "logicalType": "time-millis"}},
            {"name": "reference", "type": "bytes"}
        ]}"#,
    )?;
    Ok(schemas)
}

const LEDGER_PROJECTIONS: &str = r#"
[[projections]]
name = "balances"
topics = ["payments"]
[projections.declarative]
key = "event.account"
[[projections.declarative.on]]
event = "bank.ledger.Payment"
add = { total = "event.amount" }
min = { smallest = "event.amount", first_day = "event.paidOn" }
max = { largest = "event.amount", last_day = "event.paidOn" }
count = ["payments"]

[[projections]]
name = "payments_seen"
topics = ["payments"]
[projections.declarative]
key = "event.paymentId"
[[projections.declarative.on]]
event = "bank.ledger.Payment"
set = { id = "event.paymentId", amount = "event.amount", paid_on = "event.paidOn", cutoff = "event.cutoff", reference = "event.reference" }
"#;

/// `cents` as a decimal(12,2)'s text.
fn money(cents: i64) -> String {
    format!(
        "{}{}.{:02}",
        if cents < 0 { "-" } else { "" },
        cents.abs() / 100,
        cents.abs() % 100
    )
}

#[test]
fn decimals_dates_times_uuids_and_bytes_keep_their_meaning() -> Result<()> {
    use base64::Engine as _;
    let dir = tempfile::tempdir()?;
    let broker = Broker::start(dir.path())?;
    broker.create_topic("payments", 4)?;
    let registry = Registry::start(dir.path())?;
    let schemas = ledger_schemas(dir.path())?;

    // 10,000 payments over 40 accounts, keyed by payment: every account's
    // payments spread over the four partitions, so reads merge partials.
    let mut rng = projector_tests::seeded_rng("decimals");
    let mut lines = Vec::new();
    let mut balances: BTreeMap<String, (i64, i64, i64, String, String, u64)> = BTreeMap::new();
    let mut seen = BTreeMap::new();
    for n in 0..10_000u32 {
        let account = format!("acct-{:02}", rng.random_range(0..40));
        let cents: i64 = rng.random_range(-50_000..2_000_000);
        let day = chrono_day(rng.random_range(0..3_000));
        let cutoff_ms: u32 = rng.random_range(0..86_400_000);
        let cutoff = format!(
            "{:02}:{:02}:{:02}.{:03}",
            cutoff_ms / 3_600_000,
            cutoff_ms / 60_000 % 60,
            cutoff_ms / 1000 % 60,
            cutoff_ms % 1000
        );
        let id = format!("00000000-0000-4000-8000-{n:012}");
        let reference = base64::engine::general_purpose::STANDARD.encode([n as u8, 0xFF, (n >> 8) as u8]);
        let value = json!({"paymentId": id, "account": account, "amount": money(cents),
                           "paidOn": day, "cutoff": cutoff, "reference": reference});
        lines.push(json!({"topic": "payments", "key": id, "type": "bank.ledger.Payment", "value": value}));
        let entry = balances
            .entry(account)
            .or_insert((0, i64::MAX, i64::MIN, day.clone(), day.clone(), 0));
        entry.0 += cents;
        entry.1 = entry.1.min(cents);
        entry.2 = entry.2.max(cents);
        entry.3 = entry.3.clone().min(day.clone());
        entry.4 = entry.4.clone().max(day.clone());
        entry.5 += 1;
        seen.insert(
            id.clone(),
            json!({"id": id, "amount": money(cents), "paid_on": day, "cutoff": cutoff, "reference": reference}),
        );
    }
    produce_shapes(
        dir.path(),
        &broker,
        &registry,
        &lines,
        "records",
        &[("bank.ledger.Payment", schemas.join("bank.ledger/Payment.v1.avsc"))],
        None,
    )?;

    let config = worker_config(&broker, &registry, &dir.path().join("data"), LEDGER_PROJECTIONS).replace(
        &format!("dir = \"{}\"", repo_root().join("schemas").display()),
        &format!("dir = \"{}\"", schemas.display()),
    );
    let mut worker = Worker::start(dir.path(), &config)?;
    // `projector check` accepts a schema set with every logical type.
    let check = std::process::Command::new(projector_tests::projector_bin())
        .args(["check", "--config"])
        .arg(worker.config_path())
        .current_dir(repo_root())
        .output()?;
    ensure!(
        check.status.success(),
        "projector check: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    wait_applied(&mut worker, "balances", lines.len(), Duration::from_secs(180))?;
    wait_applied(
        &mut worker,
        "payments_seen",
        lines.len(),
        Duration::from_secs(180),
    )?;

    let expected: BTreeMap<String, Value> = balances
        .into_iter()
        .map(|(account, (total, smallest, largest, first, last, count))| {
            let state = json!({"total": money(total), "smallest": money(smallest), "largest": money(largest),
                               "first_day": first, "last_day": last, "payments": count});
            (account, state)
        })
        .collect();
    assert_matches(&worker, "balances", &expected)?;
    assert_matches(&worker, "payments_seen", &seen)?;
    Ok(())
}

/// Day `n` after 2018-01-01 as an ISO date, computed without the code under test.
fn chrono_day(n: i64) -> String {
    let mut days = n;
    let mut year = 2018;
    loop {
        let length = if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) {
            366
        } else {
            365
        };
        if days < length {
            break;
        }
        days -= length;
        year += 1;
    }
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let months = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    let mut month = 0;
    while days >= months[month] {
        days -= months[month];
        month += 1;
    }
    format!("{year}-{:02}-{:02}", month + 1, days + 1)
}

#[test]
fn avro_keys_reach_meta_key_as_their_json_text() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Broker::start(dir.path())?;
    broker.create_topic("keyed", 2)?;
    let registry = Registry::start(dir.path())?;
    set_compatibility(&registry, "NONE")?;
    let record_key = dir.path().join("OrderKey.avsc");
    std::fs::write(
        &record_key,
        r#"{"type": "record", "name": "OrderKey", "namespace": "shop.keys", "fields": [
            {"name": "region", "type": "string"}, {"name": "id", "type": "long"}]}"#,
    )?;
    let string_key = dir.path().join("StringKey.avsc");
    std::fs::write(&string_key, r#"{"type": "string"}"#)?;
    let delivered = |n: usize, key: Value| {
        json!({"topic": "keyed", "key": key, "type": "shop.orders.OrderDelivered",
               "value": {"orderId": format!("order-{n}"), "deliveredAt": n}})
    };
    let record_keyed: Vec<Value> = (0..60)
        .map(|n| {
            let region = if n % 2 == 0 { "eu" } else { "us" };
            delivered(n, json!({"region": region, "id": n % 7}))
        })
        .collect();
    let string_keyed: Vec<Value> = (60..100)
        .map(|n| delivered(n, json!(format!("k-{}", n % 5))))
        .collect();
    let schemas = [(
        "shop.orders.OrderDelivered",
        order_schema("OrderDelivered.v1.avsc"),
    )];
    produce_shapes(
        dir.path(),
        &broker,
        &registry,
        &record_keyed,
        "records",
        &schemas,
        Some(&record_key),
    )?;
    produce_shapes(
        dir.path(),
        &broker,
        &registry,
        &string_keyed,
        "records",
        &schemas,
        Some(&string_key),
    )?;

    let projections = r#"
[[projections]]
name = "by_key"
topics = ["keyed"]
[projections.declarative]
key = "meta.key"
[[projections.declarative.on]]
event = "*"
count = ["events"]
"#;
    let mut worker = Worker::start(
        dir.path(),
        &worker_config(&broker, &registry, &dir.path().join("data"), projections),
    )?;
    let total = record_keyed.len() + string_keyed.len();
    wait_applied(&mut worker, "by_key", total, Duration::from_secs(120))?;
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    for line in record_keyed.iter().chain(&string_keyed) {
        let text = match &line["key"] {
            Value::String(text) => text.clone(),
            other => serde_json::to_string(other)?,
        };
        *expected.entry(text).or_default() += 1;
    }
    ensure!(expected.len() == 14 + 5, "{expected:?}");
    for (key, count) in &expected {
        let (status, body) = worker.get(&format!("/projections/by_key/state/{}", percent_encode(key)))?;
        ensure!(
            status == 200 && body["events"] == json!(count),
            "key {key}: got {status} {body}, want {count} events"
        );
    }
    let (status, _) = worker.get("/projections/by_key/state/k-0")?;
    ensure!(status == 200, "a string key is its plain text");
    Ok(())
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

fn get_json(url: &str) -> Result<(u16, Value)> {
    let response = projector_tests::http().get(url).send().context(url.to_owned())?;
    let status = response.status().as_u16();
    Ok((status, response.json().unwrap_or(Value::Null)))
}
