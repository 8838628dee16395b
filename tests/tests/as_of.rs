//! Projections as of a past time on real parts: events spread over a year of
//! record time; three as-of generations (two through the API, one through
//! `projector as-of --wait`) each equal an oracle that folds only the events up
//! to their time, while the live generation keeps folding new events and ends
//! equal to the full oracle. Reads name a generation with `?at=`; an unknown one
//! is a 404 listing those there are; one survives a SIGKILL; a removed one is
//! gone, its column family with it.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use projector_tests::{
    column_families_on_disk, http, order_summary_projections, orders, produce, produce_command,
    projector_bin, repo_root, wait_applied, wait_for_oracle, wait_until, worker_config, write_events, Broker,
    Registry, Worker,
};
use serde_json::{json, Value};

const TOKEN: &str = "as-of-admin";
/// 2025-01-01T00:00:00Z
const YEAR_START_MS: i64 = 1_735_689_600_000;
const YEAR_MS: i64 = 365 * 86_400_000;

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .expect("a time")
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

fn request_as_of(worker: &Worker, until: &str) -> Result<(u16, Value)> {
    let response = http()
        .post(format!("{}/projections/order_summary/as-of", worker.url()))
        .bearer_auth(TOKEN)
        .json(&json!({ "until": until }))
        .send()?;
    let status = response.status().as_u16();
    Ok((status, response.json().unwrap_or(Value::Null)))
}

/// The as-of generation of `until` as `/projections/order_summary` lists it.
fn listed(worker: &Worker, until: &str) -> Result<Option<Value>> {
    let projection = worker.projection("order_summary")?;
    Ok(projection["as_of_generations"]
        .as_array()
        .context("as_of_generations")?
        .iter()
        .find(|g| g["until"] == until)
        .cloned())
}

/// Every key of the full oracle read `at` the as-of time: equal to the oracle
/// of the events up to it, or 404 when the order was placed after it.
fn assert_as_of(
    worker: &Worker,
    until: &str,
    expected: &BTreeMap<String, Value>,
    all: &BTreeMap<String, Value>,
) -> Result<()> {
    let mut mismatches = Vec::new();
    for key in all.keys() {
        let (status, mut got) = worker.get(&format!("/projections/order_summary/state/{key}?at={until}"))?;
        match expected.get(key) {
            Some(want) => {
                let answered_for = got.as_object_mut().and_then(|f| {
                    f.remove("as_of");
                    f.remove("until")
                });
                if status != 200 || &got != want || answered_for != Some(json!(until)) {
                    mismatches.push(format!(
                        "{key}: got {status} {got} (until {answered_for:?}), want {want}"
                    ));
                }
            }
            None if status != 404 => {
                mismatches.push(format!("{key}: got {status} {got}, placed after {until}"))
            }
            None => {}
        }
    }
    ensure!(
        mismatches.is_empty(),
        "as of {until}: {} of {} keys differ, e.g.\n{}",
        mismatches.len(),
        all.len(),
        mismatches.iter().take(5).cloned().collect::<Vec<_>>().join("\n")
    );
    Ok(())
}

#[test]
fn three_as_of_generations_equal_their_oracles_while_the_live_one_folds_on() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Broker::start(dir.path())?;
    broker.create_topic("orders", 4)?;
    let registry = Registry::start(dir.path())?;

    // Events spread evenly over 2025 by record time, in production order.
    let mut stream = orders::generate("orders", 1_500, 61);
    let step = YEAR_MS / stream.lines.len() as i64;
    for (index, line) in stream.lines.iter_mut().enumerate() {
        line["timestamp"] = json!(YEAR_START_MS + index as i64 * step);
    }
    let lines = stream.lines.clone();
    let first = lines.len() * 3 / 4;
    produce(
        &broker,
        &registry,
        &write_events(dir.path(), "first.jsonl", &lines[..first])?,
    )?;

    let projections = order_summary_projections(&[("order_summary", "orders")]);
    let config = worker_config(&broker, &registry, &dir.path().join("data"), &projections)
        .replace("[http]\n", &format!("[http]\nadmin_token = \"{TOKEN}\"\n"));
    let mut worker = Worker::start(dir.path(), &config)?;
    wait_applied(&mut worker, "order_summary", first, Duration::from_secs(120))?;
    // The rest arrives while the as-of generations fold (all of it after their times).
    let mut producer = produce_command(
        &broker,
        &registry,
        &write_events(dir.path(), "rest.jsonl", &lines[first..])?,
        200,
    )
    .spawn()?;
    wait_applied(
        &mut worker,
        "order_summary",
        first + 200,
        Duration::from_secs(120),
    )?;

    // Each time falls between two events: the oracle folds the lines up to `last`.
    let cuts: Vec<(usize, String)> = [lines.len() / 5, lines.len() * 9 / 20, lines.len() * 7 / 10]
        .into_iter()
        .map(|last| (last, rfc3339(YEAR_START_MS + last as i64 * step + step / 2)))
        .collect();
    for (_, until) in &cuts[..2] {
        let (status, body) = request_as_of(&worker, until)?;
        ensure!(status == 202, "POST as-of {until}: {status} {body}");
        ensure!(body["as_of_generation"]["until"] == until.as_str(), "{body}");
    }
    let (status, body) = request_as_of(&worker, &cuts[0].1)?;
    ensure!(status == 409, "the same time again: {status} {body}");
    let output = std::process::Command::new(projector_bin())
        .args([
            "as-of",
            "order_summary",
            "--until",
            &cuts[2].1,
            "--wait",
            "--config",
        ])
        .arg(worker.config_path())
        .current_dir(repo_root())
        .output()?;
    ensure!(
        output.status.success() && String::from_utf8_lossy(&output.stdout).contains("complete"),
        "projector as-of --wait: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    for (_, until) in &cuts {
        wait_until(
            &format!("the as-of generation until {until}"),
            Duration::from_secs(120),
            || {
                listed(&worker, until)
                    .ok()
                    .flatten()
                    .is_some_and(|g| g["complete"] == true)
            },
        )?;
    }

    let all = orders::oracle(&lines);
    for (last, until) in &cuts {
        assert_as_of(&worker, until, &orders::oracle(&lines[..=*last]), &all)?;
    }
    // A scan answers from the generation too.
    let (status, page) = worker.get(&format!(
        "/projections/order_summary/state?at={}&limit=1000",
        cuts[0].1
    ))?;
    let expected = orders::oracle(&lines[..=cuts[0].0]);
    ensure!(
        status == 200 && page["until"] == cuts[0].1.as_str(),
        "{status} {page}"
    );
    let items = page["items"].as_array().context("items")?;
    ensure!(
        items.len() == expected.len().min(1000)
            && items
                .iter()
                .all(|i| expected.get(i["key"].as_str().unwrap_or_default()) == Some(&i["value"])),
        "the scan as of {} returned {} items of {}",
        cuts[0].1,
        items.len(),
        expected.len()
    );
    let missing = rfc3339(YEAR_START_MS + 5);
    let (status, body) = worker.get(&format!(
        "/projections/order_summary/state/order-61-000000?at={missing}"
    ))?;
    ensure!(
        status == 404 && body["available"].as_array().is_some_and(|a| a.len() == 3),
        "an unknown time: {status} {body}"
    );

    // The live generation folded on and equals the full oracle.
    ensure!(producer.wait()?.success(), "the producer finished");
    wait_for_oracle(&mut worker, &stream, Duration::from_secs(120))?;

    // Complete generations survive a SIGKILL; a removed one is gone with its data.
    worker.restart(dir.path())?;
    assert_as_of(&worker, &cuts[1].1, &orders::oracle(&lines[..=cuts[1].0]), &all)?;
    let removed = listed(&worker, &cuts[2].1)?.context("listed")?;
    let (status, body) = worker.delete(&format!("/projections/order_summary/as-of/{}", cuts[2].1), TOKEN)?;
    ensure!(status == 200, "DELETE: {status} {body}");
    let (status, _) = worker.get(&format!(
        "/projections/order_summary/state/order-61-000000?at={}",
        cuts[2].1
    ))?;
    ensure!(status == 404, "a removed generation is not read: {status}");
    let column_family = format!("order_summary@{}", removed["generation"]);
    let data = dir.path().join("data");
    wait_until(
        "the removed generation's column family to be dropped",
        Duration::from_secs(30),
        || column_families_on_disk(&data).is_ok_and(|cfs| !cfs.contains(&column_family)),
    )?;
    Ok(())
}
