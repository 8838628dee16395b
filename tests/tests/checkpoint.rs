//! State checkpoints on real parts: a checkpoint taken from a worker under load
//! seeds a second store; a worker started on it continues from the checkpoint's
//! offsets (equal to the oracle, folding only what came after them). A checkpoint
//! of a stopped store, a restore into a non-empty store and a checkpoint of an
//! unknown format are covered too.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use projector_tests::{
    metric_value, order_summary_projections, orders, produce_command, projector_bin, repo_root, wait_applied,
    wait_for_oracle, worker_config, write_events, Broker, Registry, Worker,
};
use serde_json::Value;

/// Runs `projector <args>`; its exit status and everything it wrote.
fn projector(args: &[&str], config: &Path) -> Result<(bool, String)> {
    let output = std::process::Command::new(projector_bin())
        .args(args)
        .arg("--config")
        .arg(config)
        .current_dir(repo_root())
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok((output.status.success(), text))
}

/// The events the checkpoint's `order_summary` had applied (sum of its offsets).
fn checkpointed_events(dir: &Path) -> Result<i64> {
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("projector-checkpoint.json"))?)?;
    let projection = manifest["projections"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "order_summary"))
        .context("order_summary in the manifest")?;
    Ok(projection["offsets"]
        .as_object()
        .map(|o| o.values().filter_map(Value::as_i64).sum())
        .unwrap_or(0))
}

#[test]
fn a_checkpoint_under_load_seeds_a_worker_that_folds_only_what_came_after() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Broker::start(dir.path())?;
    broker.create_topic("orders", 4)?;
    let registry = Registry::start(dir.path())?;
    let projections = order_summary_projections(&[("order_summary", "orders")]);
    let (first_dir, second_dir) = (dir.path().join("first"), dir.path().join("second"));
    std::fs::create_dir_all(&first_dir)?;
    std::fs::create_dir_all(&second_dir)?;
    let first_config = worker_config(&broker, &registry, &first_dir.join("data"), &projections)
        .replace("[http]\n", "[http]\nadmin_token = \"the-admin\"\n");
    let mut first = Worker::start(&first_dir, &first_config)?;

    let stream = orders::generate("orders", 3_000, 51);
    let events = write_events(dir.path(), "events.jsonl", &stream.lines)?;
    let mut producer = produce_command(&broker, &registry, &events, 2_000).spawn()?;
    wait_applied(&mut first, "order_summary", 2_000, Duration::from_secs(60))?;

    // Under load, through the worker's API.
    let taken = dir.path().join("checkpoint");
    let (ok, text) = projector(
        &["checkpoint", "--to", &taken.display().to_string()],
        first.config_path(),
    )?;
    ensure!(ok, "projector checkpoint: {text}");
    let at_checkpoint = checkpointed_events(&taken)?;
    ensure!(
        at_checkpoint >= 2_000 && (at_checkpoint as usize) < stream.lines.len(),
        "taken under load: {at_checkpoint} of {} applied",
        stream.lines.len()
    );
    // The same directory again is refused, not overwritten.
    let (ok, text) = projector(
        &["checkpoint", "--to", &taken.display().to_string()],
        first.config_path(),
    )?;
    ensure!(!ok && text.contains("not empty"), "{text}");

    ensure!(producer.wait()?.success(), "the producer finished");
    wait_for_oracle(&mut first, &stream, Duration::from_secs(120))?;

    // A second worker, its own store and consumer group, seeded from the checkpoint.
    let second_config = worker_config(&broker, &registry, &second_dir.join("data"), &projections).replace(
        "group_prefix = \"projector-test\"",
        "group_prefix = \"projector-second\"",
    );
    std::fs::write(
        second_dir.join("restore.toml"),
        second_config.replace("{HTTP_LISTEN}", "127.0.0.1:1"),
    )?;
    let (ok, text) = projector(
        &["restore", "--from", &taken.display().to_string()],
        &second_dir.join("restore.toml"),
    )?;
    ensure!(ok, "projector restore: {text}");
    let (ok, text) = projector(
        &["restore", "--from", &taken.display().to_string()],
        &second_dir.join("restore.toml"),
    )?;
    ensure!(
        !ok && text.contains("not empty"),
        "a second restore is refused: {text}"
    );

    let mut second = Worker::start(&second_dir, &second_config)?;
    wait_for_oracle(&mut second, &stream, Duration::from_secs(120))?;
    let applied = |worker: &Worker| -> Result<f64> {
        metric_value(
            &worker.metrics()?,
            "projector_events_applied_total",
            &[("projection", "order_summary")],
        )
        .context("projector_events_applied_total")
    };
    let folded = applied(&second)? as i64;
    ensure!(
        folded == stream.lines.len() as i64 - at_checkpoint,
        "the seeded worker folded {folded} events; {} came after the checkpoint's offsets",
        stream.lines.len() as i64 - at_checkpoint
    );

    // A stopped store is checkpointed directly.
    first.service.signal("TERM")?;
    first.service.wait_exit(Duration::from_secs(30))?;
    let stopped = dir.path().join("stopped");
    let (ok, text) = projector(
        &["checkpoint", "--to", &stopped.display().to_string()],
        first.config_path(),
    )?;
    ensure!(ok, "checkpoint of a stopped store: {text}");
    ensure!(checkpointed_events(&stopped)? == stream.lines.len() as i64);

    // A checkpoint of a format this build does not read is refused, saying why.
    let manifest = stopped.join("projector-checkpoint.json");
    let text = std::fs::read_to_string(&manifest)?.replace("\"format\": 1", "\"format\": 99");
    std::fs::write(&manifest, text)?;
    let third = dir.path().join("third");
    std::fs::create_dir_all(&third)?;
    std::fs::write(
        third.join("restore.toml"),
        worker_config(&broker, &registry, &third.join("data"), &projections)
            .replace("{HTTP_LISTEN}", "127.0.0.1:1"),
    )?;
    let (ok, text) = projector(
        &["restore", "--from", &stopped.display().to_string()],
        &third.join("restore.toml"),
    )?;
    ensure!(
        !ok && text.contains("format 99") && text.contains("reads format 1"),
        "{text}"
    );
    Ok(())
}
