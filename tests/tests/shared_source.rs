//! Shared sources on real parts: projections over one topic (built-in and
//! declarative) fold from one shared source while a producer writes; one is
//! stopped by a poison event (the others fold on past it) and resumed past it;
//! one is replayed and switched; the worker is SIGKILLed twice, the second time
//! restarting with a projection added to the config, which backfills on its own
//! and then joins. Every projection ends equal to its oracle on every key
//! (`order_summary`'s `version` shows any double apply) and folding in the
//! shared source.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use projector_tests::read_models::{self, stamp};
use projector_tests::{
    assert_matches, orders, produce_command, wait_applied, wait_until, worker_config, write_events, Broker,
    Registry, Worker,
};
use serde_json::{json, Value};

const TOKEN: &str = "shared-admin";

fn projections(with_late: bool) -> String {
    let mut text = String::from(
        r#"
[[projections]]
name = "order_summary"
kind = "order_summary"
topics = ["orders"]
[[projections]]
name = "customer_orders"
kind = "customer_orders"
topics = ["orders"]
on_poison = "skip"
[[projections]]
name = "revenue_by_day"
kind = "revenue_by_day"
topics = ["orders"]
on_poison = "skip"
"#,
    );
    let skip = "on_poison = \"skip\"\n[projections.declarative]";
    text.push_str(&read_models::order_lines_projection("orders").replace("[projections.declarative]", skip));
    text.push_str(
        &read_models::customer_stats_projection("orders").replace("[projections.declarative]", skip),
    );
    if with_late {
        text.push_str("[[projections]]\nname = \"summary_late\"\nkind = \"order_summary\"\ntopics = [\"orders\"]\non_poison = \"skip\"\n");
    }
    text
}

fn state(worker: &Worker, name: &str) -> String {
    worker
        .projection(name)
        .map(|p| p["status"]["state"].as_str().unwrap_or_default().to_owned())
        .unwrap_or_default()
}

fn shared(worker: &Worker, name: &str) -> bool {
    worker.projection(name).is_ok_and(|p| p["shared_source"] == true)
}

#[test]
fn projections_share_a_source_through_poison_replay_new_projections_and_sigkills() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Broker::start(dir.path())?;
    broker.create_topic("orders", 4)?;
    let registry = Registry::start(dir.path())?;

    let stream = orders::generate("orders", 2_500, 71);
    let mut lines = stream.lines.clone();
    stamp(&mut lines);
    let poison_at = lines.len() / 4;
    let mut produced = lines.clone();
    produced.insert(
        poison_at,
        json!({"topic": "orders", "key": "order-71-000000", "raw_hex": "00ff"}),
    );
    let total = produced.len();

    let home = dir.path().join("worker");
    std::fs::create_dir_all(&home)?;
    let config = |with_late| {
        worker_config(&broker, &registry, &home.join("data"), &projections(with_late))
            .replace("[http]\n", &format!("[http]\nadmin_token = \"{TOKEN}\"\n"))
    };
    let mut worker = Worker::start(&home, &config(false))?;
    let mut producer = produce_command(
        &broker,
        &registry,
        &write_events(dir.path(), "events.jsonl", &produced)?,
        500,
    )
    .spawn()?;
    let names = [
        "order_summary",
        "customer_orders",
        "revenue_by_day",
        "order_lines",
        "customer_stats",
    ];
    wait_until(
        "every projection folding in the shared source",
        Duration::from_secs(60),
        || names.iter().all(|name| shared(&worker, name)),
    )?;

    // The poison event stops order_summary alone; the others fold on past it.
    wait_until(
        "order_summary to stop at the poison event",
        Duration::from_secs(120),
        || state(&worker, "order_summary") == "poisoned",
    )
    .with_context(|| worker.service.log())?;
    ensure!(
        !shared(&worker, "order_summary"),
        "a stopped projection leaves the shared read"
    );
    let stopped_at = worker.applied_offsets("order_summary")?;
    let past = stopped_at + 1_000;
    wait_until(
        "the others to fold 1,000 events past the poison event",
        Duration::from_secs(60),
        || {
            names[1..]
                .iter()
                .all(|name| worker.applied_offsets(name).unwrap_or(0) >= past)
        },
    )?;
    ensure!(
        worker.applied_offsets("order_summary")? == stopped_at,
        "order_summary stays where it stopped"
    );
    let (status, body) = worker.post("/projections/order_summary/skip", Some(TOKEN))?;
    ensure!(status == 202, "skip: {status} {body}");
    // Past the poison event (an operator's skip lives in memory until applied)
    // and back in the shared source.
    wait_until(
        "order_summary to skip, catch up and join again",
        Duration::from_secs(120),
        || {
            worker.applied_offsets("order_summary").unwrap_or(0) > stopped_at
                && shared(&worker, "order_summary")
        },
    )
    .with_context(|| worker.service.log())?;

    worker.restart(&home)?;
    // A replay folds on its own, switches, and its generation joins.
    let (status, body) = worker.post("/projections/customer_orders/replay", Some(TOKEN))?;
    ensure!(status == 202, "replay: {status} {body}");
    wait_until("the replay to switch", Duration::from_secs(120), || {
        worker
            .projection("customer_orders")
            .is_ok_and(|p| p["generation"] == 2)
    })
    .with_context(|| worker.service.log())?;

    // Killed again; it comes back with one more projection, which backfills.
    std::thread::sleep(Duration::from_millis(300));
    worker.service.kill();
    let mut worker = Worker::start(&home, &config(true))?;
    ensure!(producer.wait()?.success(), "the producer finished");

    let all = [&names[..], &["summary_late"]].concat();
    for name in &all {
        wait_applied(&mut worker, name, total, Duration::from_secs(180))?;
    }
    wait_until(
        "every projection folding in the shared source",
        Duration::from_secs(60),
        || all.iter().all(|name| shared(&worker, name)),
    )
    .with_context(|| {
        all.iter()
            .map(|name| format!("{name}: {}", worker.projection(name).unwrap_or(Value::Null)))
            .collect::<Vec<_>>()
            .join("\n")
    })?;

    let order_oracle = orders::oracle(&lines);
    assert_matches(&worker, "order_summary", &order_oracle)?;
    assert_matches(&worker, "summary_late", &order_oracle)?;
    assert_matches(&worker, "customer_orders", &read_models::customer_orders(&lines))?;
    assert_matches(&worker, "revenue_by_day", &read_models::revenue_by_day(&lines))?;
    assert_matches(&worker, "order_lines", &read_models::order_lines(&lines))?;
    assert_matches(&worker, "customer_stats", &read_models::customer_stats(&lines))?;
    Ok(())
}
