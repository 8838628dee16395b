//! Operating it on real parts: `/readyz`, and the Prometheus metrics an operator
//! alerts on (lag in events and seconds against the offsets stored with state, last
//! progress, batch histograms, poison counts) during an end-to-end run: lag goes to
//! 0 when caught up and grows while a poison event holds the projection. Also: the
//! production example config passes `projector check`.

use std::time::Duration;

use anyhow::{ensure, Result};
use projector_tests::{
    assert_state_matches_oracle, metric_value, order_summary_projections, orders, produce, produce_command,
    projector_bin, repo_root, run_to_completion, start_order_summary_worker, wait_applied, wait_until,
    worker_config, write_events, Broker, Registry, Worker,
};
use serde_json::json;

fn lag(metrics: &str, name: &str, partition: u32) -> Option<f64> {
    let partition = partition.to_string();
    metric_value(
        metrics,
        name,
        &[
            ("projection", "order_summary"),
            ("topic", "orders"),
            ("partition", partition.as_str()),
        ],
    )
}

#[test]
fn metrics_and_readiness_follow_the_projection() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Broker::start(dir.path())?;
    broker.create_topic("orders", 4)?;
    let registry = Registry::start(dir.path())?;
    let mut worker = start_order_summary_worker(dir.path(), &broker, &registry)?;
    wait_until("/readyz to answer 200", Duration::from_secs(60), || {
        worker
            .get("/readyz")
            .map(|(status, _)| status == 200)
            .unwrap_or(false)
    })?;
    let (status, _) = worker.get("/healthz")?;
    ensure!(status == 200);

    let stream = orders::generate("orders", 500, 8);
    produce(
        &broker,
        &registry,
        &write_events(dir.path(), "events.jsonl", &stream.lines)?,
    )?;
    wait_applied(
        &mut worker,
        "order_summary",
        stream.lines.len(),
        Duration::from_secs(60),
    )?;
    let mut metrics = String::new();
    wait_until(
        "lag to reach 0 on every partition",
        Duration::from_secs(30),
        || {
            metrics = worker.metrics().unwrap_or_default();
            (0..4).all(|p| lag(&metrics, "projector_consumer_lag_events", p) == Some(0.0))
        },
    )?;
    for p in 0..4 {
        assert_eq!(
            lag(&metrics, "projector_consumer_lag_seconds", p),
            Some(0.0),
            "partition {p}"
        );
    }
    let applied = metric_value(
        &metrics,
        "projector_events_applied_total",
        &[("projection", "order_summary")],
    );
    assert_eq!(applied, Some(stream.lines.len() as f64));
    let progress = metric_value(
        &metrics,
        "projector_last_progress_timestamp_seconds",
        &[("projection", "order_summary")],
    )
    .unwrap_or(0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    ensure!(
        (now - progress).abs() < 30.0,
        "last progress is recent: {progress} vs {now}"
    );
    ensure!(
        metric_value(
            &metrics,
            "projector_batch_commit_seconds_count",
            &[("projection", "order_summary")]
        ) > Some(0.0)
    );
    ensure!(metric_value(&metrics, "projector_batch_events_count", &[]) > Some(0.0));
    ensure!(
        metric_value(
            &metrics,
            "projector_schema_registry_requests_total",
            &[("outcome", "ok")]
        ) > Some(0.0)
    );
    assert_eq!(
        metric_value(
            &metrics,
            "projector_projection_up",
            &[("projection", "order_summary")]
        ),
        Some(1.0)
    );

    // A poison event, then more events of the same key behind it.
    let key = "order-8-000001";
    let mut bad = vec![json!({"topic": "orders", "key": key, "raw_hex": "00ff"})];
    for i in 0..5 {
        bad.push(json!({"topic": "orders", "key": key, "type": "OrderDelivered",
                        "value": {"orderId": key, "deliveredAt": i}}));
    }
    // One record per batch: Tansu reports the high watermark of a partition whose
    // last batch holds several records as that batch's first offset + 1.
    let mut command = produce_command(
        &broker,
        &registry,
        &write_events(dir.path(), "bad.jsonl", &bad)?,
        0,
    );
    command.arg("--flush-each");
    run_to_completion(command)?;
    let description = {
        let mut last = json!(null);
        wait_until("the projection to stop", Duration::from_secs(30), || {
            last = worker.projection("order_summary").unwrap_or_default();
            last["status"]["state"] == "poisoned"
        })?;
        last
    };
    let partition = description["status"]["partition"].as_u64().unwrap_or(0) as u32;
    let mut first = 0.0;
    let mut events = None;
    wait_until("lag to show the held events", Duration::from_secs(30), || {
        let metrics = worker.metrics().unwrap_or_default();
        first = lag(&metrics, "projector_consumer_lag_seconds", partition).unwrap_or(0.0);
        events = lag(&metrics, "projector_consumer_lag_events", partition);
        events == Some(6.0) && first > 0.0
    })
    .map_err(|e| {
        anyhow::anyhow!("{e}: partition {partition}, lag {events:?} events, {first} s; {description}")
    })?;
    std::thread::sleep(Duration::from_secs(3));
    let metrics = worker.metrics()?;
    let later = lag(&metrics, "projector_consumer_lag_seconds", partition).unwrap_or(0.0);
    ensure!(
        later > first + 1.0,
        "lag in seconds grows while stopped: {first} then {later}"
    );
    assert_eq!(
        metric_value(
            &metrics,
            "projector_poison_events_total",
            &[("projection", "order_summary"), ("reason", "bad_frame")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &metrics,
            "projector_projection_up",
            &[("projection", "order_summary")]
        ),
        Some(0.0)
    );
    let (status, body) = worker.get("/readyz")?;
    ensure!(
        status == 503
            && body["reasons"][0]
                .as_str()
                .unwrap_or_default()
                .contains("poisoned"),
        "{status} {body}"
    );
    Ok(())
}

#[test]
fn the_production_example_config_passes_check() -> Result<()> {
    let output = std::process::Command::new(projector_bin())
        .args(["check", "--config", "config/production.toml"])
        .current_dir(repo_root())
        .env("PROJECTOR__REGISTRY__PASSWORD", "s3cret-registry")
        .env("PROJECTOR__HTTP__ADMIN_TOKEN", "s3cret-token")
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(output.status.success(), "projector check failed: {text}");
    ensure!(text.contains("ok"), "{text}");
    ensure!(!text.contains("s3cret"), "no secret in the output: {text}");
    Ok(())
}

#[test]
fn projector_demo_serves_its_projections() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let port = projector_tests::free_port();
    let mut command = std::process::Command::new(projector_bin());
    command
        .args(["demo", "--listen", &format!("127.0.0.1:{port}")])
        .current_dir(repo_root());
    let mut demo = projector_tests::Service::start("projector demo", command, &dir.path().join("demo.log"))?;
    let get = |path: &str| -> Result<(u16, serde_json::Value)> {
        let response = projector_tests::http()
            .get(format!("http://127.0.0.1:{port}{path}"))
            .send()?;
        Ok((response.status().as_u16(), response.json().unwrap_or_default()))
    };
    let mut order = json!(null);
    wait_until("the demo to fold order-000042", Duration::from_secs(90), || {
        demo.check_alive().is_ok()
            && get("/projections/order_summary/state/order-000042")
                .map(|(status, body)| {
                    order = body;
                    status == 200
                })
                .unwrap_or(false)
    })
    .map_err(|e| anyhow::anyhow!("{e}; demo output:\n{}", demo.log()))?;
    ensure!(
        order["order_id"] == "order-000042" && order["as_of"].is_object(),
        "{order}"
    );
    // order-000040 was written as OrderPlaced v1 (euros as a double) and upcast.
    let mut upcast = json!(null);
    wait_until("an upcast order", Duration::from_secs(30), || {
        get("/projections/order_summary/state/order-000040")
            .map(|(s, b)| {
                upcast = b;
                s == 200
            })
            .unwrap_or(false)
    })?;
    ensure!(
        upcast["currency"] == "EUR" && upcast["total_cents"].as_i64() > Some(0),
        "{upcast}"
    );
    // Each projection has its own consumer group and catches up at its own pace.
    let mut days = json!(null);
    wait_until("revenue_by_day to have days", Duration::from_secs(60), || {
        get("/projections/revenue_by_day/state?limit=5")
            .map(|(status, body)| {
                days = body;
                status == 200 && days["items"].as_array().is_some_and(|items| !items.is_empty())
            })
            .unwrap_or(false)
    })
    .map_err(|e| anyhow::anyhow!("{e}: {days}"))?;
    wait_until(
        "every demo projection to be ready",
        Duration::from_secs(60),
        || get("/readyz").map(|(s, _)| s == 200).unwrap_or(false),
    )?;
    // Lag is exported for the partitions a worker owns, from the lag monitor's
    // first refresh (every 2 s) after they were assigned.
    wait_until(
        "lag series for the assigned partitions",
        Duration::from_secs(10),
        || {
            projector_tests::http()
                .get(format!("http://127.0.0.1:{port}/metrics"))
                .send()
                .and_then(|r| r.text())
                .is_ok_and(|text| {
                    text.lines()
                        .any(|l| l.starts_with("projector_consumer_lag_seconds{"))
                })
        },
    )?;
    let (status, projections) = get("/projections")?;
    ensure!(
        status == 200 && projections["projections"].as_array().map(Vec::len) == Some(5),
        "{projections}"
    );
    // Every command it suggests works, as a new user would paste it.
    let output = demo.log();
    let suggestions: Vec<&str> = output
        .lines()
        .skip_while(|l| *l != "Try:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .map(str::trim)
        .collect();
    ensure!(
        suggestions.len() >= 8 && suggestions.iter().any(|s| s.contains("/replay")),
        "it prints what to try:\n{output}"
    );
    for suggestion in &suggestions {
        let ran = std::process::Command::new("sh")
            .args(["-c", suggestion])
            .current_dir(repo_root())
            .output()?;
        let stdout = String::from_utf8_lossy(&ran.stdout);
        ensure!(
            ran.status.success() && !stdout.trim().is_empty() && !stdout.contains("\"error\""),
            "`{suggestion}`: {}\n{stdout}\n{}",
            ran.status,
            String::from_utf8_lossy(&ran.stderr)
        );
    }
    wait_until(
        "the suggested order_summary replay to switch",
        Duration::from_secs(120),
        || get("/projections/order_summary").is_ok_and(|(_, p)| p["generation"] == 2),
    )?;
    demo.signal("INT")?;
    let status = demo.wait_exit(Duration::from_secs(60))?;
    ensure!(status.success(), "Ctrl-C stops the demo cleanly: {status}");
    Ok(())
}

#[test]
fn reset_rebuilds_one_projection_from_offset_zero() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Broker::start(dir.path())?;
    broker.create_topic("orders", 2)?;
    let registry = Registry::start(dir.path())?;
    let stream = orders::generate("orders", 300, 4);
    produce(
        &broker,
        &registry,
        &write_events(dir.path(), "events.jsonl", &stream.lines)?,
    )?;
    let projections = order_summary_projections(&[("order_summary", "orders"), ("untouched", "orders")]);
    let config = worker_config(&broker, &registry, &dir.path().join("data"), &projections);
    let mut worker = Worker::start(dir.path(), &config)?;
    wait_applied(
        &mut worker,
        "order_summary",
        stream.lines.len(),
        Duration::from_secs(60),
    )?;
    wait_applied(
        &mut worker,
        "untouched",
        stream.lines.len(),
        Duration::from_secs(60),
    )?;

    let reset = || {
        std::process::Command::new(projector_bin())
            .args(["reset", "order_summary", "--config"])
            .arg(dir.path().join("projector.toml"))
            .output()
    };
    let refused = reset()?;
    ensure!(
        !refused.status.success(),
        "reset refuses while the worker holds the store"
    );
    ensure!(
        String::from_utf8_lossy(&refused.stderr).contains("still running"),
        "{refused:?}"
    );

    worker.service.signal("TERM")?;
    ensure!(worker.service.wait_exit(Duration::from_secs(30))?.success());
    let done = reset()?;
    ensure!(done.status.success(), "reset: {done:?}");

    worker.restart(dir.path())?;
    wait_applied(
        &mut worker,
        "order_summary",
        stream.lines.len(),
        Duration::from_secs(60),
    )?;
    let metrics = worker.metrics()?;
    let applied = |name: &str| {
        metric_value(
            &metrics,
            "projector_events_applied_total",
            &[("projection", name)],
        )
    };
    assert_eq!(
        applied("order_summary"),
        Some(stream.lines.len() as f64),
        "refolded from offset 0"
    );
    assert_eq!(
        applied("untouched").unwrap_or(0.0),
        0.0,
        "the other projection went on from its offsets"
    );
    assert_state_matches_oracle(&worker, &stream)
}
