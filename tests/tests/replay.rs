//! Full replays on real parts: a new generation is built beside the live one while
//! readers keep reading and producers keep writing, and switched in atomically.
//! Readers never see a gap or a value older than one they saw; the new generation
//! equals the oracle; the old one is gone from disk; a SIGKILL mid-replay resumes
//! it; a changed declarative projection serves its old logic until the switch.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use projector_tests::{
    assert_matches, assert_state_matches_oracle, column_families_on_disk, http, metric_value,
    order_summary_projections, orders, produce, produce_command, projector_bin, repo_root, wait_applied,
    wait_for_oracle, wait_until, worker_config, write_events, Broker, Registry, Service, Worker,
};
use serde_json::{json, Value};

const TOKEN: &str = "replay-admin-token";

/// A worker config with the admin token and replays capped at `replay_rate`
/// events/s, so a replay lasts long enough to read, kill or abort during it.
fn replay_config(
    broker: &Broker,
    registry: &Registry,
    data: &Path,
    projections: &str,
    replay_rate: u32,
) -> String {
    let mut text = worker_config(broker, registry, data, projections)
        .replace("[http]\n", &format!("[http]\nadmin_token = \"{TOKEN}\"\n"));
    text.push_str(&format!("[replay]\nmax_events_per_second = {replay_rate}\n"));
    text
}

/// What a reader polling keys during a replay saw.
#[derive(Debug, Default)]
struct ReaderReport {
    reads: usize,
    violations: Vec<String>,
    /// Per key, the shapes seen in order (for the declarative test).
    shapes: Vec<&'static str>,
}

/// A reader thread and how to stop it.
struct Reader {
    thread: std::thread::JoinHandle<ReaderReport>,
    stop: Arc<AtomicBool>,
    reads: Arc<AtomicUsize>,
    keys: usize,
}

impl Reader {
    /// Lets it read every key once more (so it reads after whatever just
    /// happened), then stops it.
    fn finish(self) -> Result<ReaderReport> {
        let target = self.reads.load(Ordering::Relaxed) + self.keys;
        wait_until(
            "the reader to read every key again",
            Duration::from_secs(60),
            || self.reads.load(Ordering::Relaxed) >= target,
        )?;
        self.stop.store(true, Ordering::Relaxed);
        Ok(self.thread.join().expect("the reader thread"))
    }
}

/// Polls `keys` round-robin every 2 ms until stopped, checking each answer with
/// `check(key, previous answer of that key, status, answer)`, which returns a
/// violation.
fn spawn_reader(
    base: String,
    projection: &'static str,
    keys: Vec<String>,
    check: impl Fn(&str, Option<&Value>, u16, &Value) -> Option<String> + Send + 'static,
) -> Reader {
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let key_count = keys.len();
    let (stop_flag, read_count) = (stop.clone(), reads.clone());
    let thread = std::thread::spawn(move || {
        let stop = stop_flag;
        let client = http();
        let mut report = ReaderReport::default();
        let mut last: HashMap<String, Value> = HashMap::new();
        while !stop.load(Ordering::Relaxed) {
            for key in &keys {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let url = format!("{base}/projections/{projection}/state/{key}");
                let Ok(response) = client.get(&url).send() else {
                    report.violations.push(format!("{key}: no answer"));
                    continue;
                };
                let status = response.status().as_u16();
                let body: Value = response.json().unwrap_or(Value::Null);
                report.reads += 1;
                read_count.fetch_add(1, Ordering::Relaxed);
                if let Some(violation) = check(key, last.get(key), status, &body) {
                    report.violations.push(violation);
                }
                let shape = if body.get("seen").is_some() { "new" } else { "old" };
                if report.shapes.last() != Some(&shape) {
                    report.shapes.push(shape);
                }
                last.insert(key.clone(), body);
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        report
    });
    Reader {
        thread,
        stop,
        reads,
        keys: key_count,
    }
}

fn projection_body(worker: &Worker, name: &str) -> Result<Value> {
    worker.projection(name)
}

/// Waits for the replay to have made visible progress (the lag monitor's
/// refresh); its progress.
fn wait_replay_progress(worker: &Worker, name: &str, at_least: i64) -> Result<Value> {
    let mut progress = Value::Null;
    wait_until(
        &format!("{name}'s replay to apply {at_least} events"),
        Duration::from_secs(120),
        || {
            progress = projection_body(worker, name)
                .map(|p| p["replay"]["progress"].clone())
                .unwrap_or(Value::Null);
            progress["target"].as_i64().unwrap_or(0) > 0
                && progress["applied"].as_i64().unwrap_or(0) >= at_least
        },
    )?;
    Ok(progress)
}

fn wait_generation(worker: &mut Worker, name: &str, generation: u64) -> Result<()> {
    let mut seen = Value::Null;
    let outcome = wait_until(
        &format!("{name} to switch to generation {generation}"),
        Duration::from_secs(180),
        || {
            seen = projection_body(worker, name).unwrap_or(Value::Null);
            seen["generation"].as_u64() == Some(generation)
        },
    );
    outcome.with_context(|| format!("last seen: {seen}\nworker log:\n{}", worker.service.log()))
}

fn wait_column_families(data: &Path, present: &[&str], absent: &[&str]) -> Result<()> {
    let mut families = Vec::new();
    wait_until("the column families on disk", Duration::from_secs(30), || {
        families = column_families_on_disk(data).unwrap_or_default();
        present.iter().all(|p| families.iter().any(|f| f == p))
            && absent.iter().all(|a| !families.iter().any(|f| f == a))
    })
    .with_context(|| format!("on disk: {families:?}; want {present:?}, not {absent:?}"))
}

#[test]
fn replay_under_load_switches_without_a_reader_seeing_a_gap_or_an_older_value() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Broker::start(dir.path())?;
    broker.create_topic("orders", 4)?;
    let registry = Registry::start(dir.path())?;
    let data = dir.path().join("data");
    let projections = order_summary_projections(&[("order_summary", "orders")]);
    // The handover starts while the replay is still thousands of events behind,
    // so the live generation stops well before the new one has caught up to it:
    // a switch at that moment would show readers older values.
    let config = replay_config(&broker, &registry, &data, &projections, 3_000)
        .replace("[replay]\n", "[replay]\nswitch_lag_events = 6000\n");
    let mut worker = Worker::start(dir.path(), &config)?;

    let stream = orders::generate("orders", 5_000, 11);
    let (before, during) = stream.lines.split_at(12_000);
    produce(
        &broker,
        &registry,
        &write_events(dir.path(), "before.jsonl", before)?,
    )?;
    wait_applied(
        &mut worker,
        "order_summary",
        before.len(),
        Duration::from_secs(120),
    )?;
    let expected_before = orders::oracle(before);
    assert_matches(&worker, "order_summary", &expected_before)?;

    // A producer keeps writing through the whole replay (about 10 s at 800/s).
    let mut producer = Service::start(
        "producer",
        produce_command(
            &broker,
            &registry,
            &write_events(dir.path(), "during.jsonl", during)?,
            800,
        ),
        &dir.path().join("producer.log"),
    )?;
    let keys: Vec<String> = expected_before.keys().step_by(15).cloned().collect();
    let reader = spawn_reader(worker.url(), "order_summary", keys, |key, last, status, body| {
        if status != 200 {
            return Some(format!("{key}: {status} {body}"));
        }
        let version = body["version"].as_u64().unwrap_or(0);
        let previous = last.and_then(|l| l["version"].as_u64()).unwrap_or(0);
        (version < previous).then(|| format!("{key}: version {version} after {previous}"))
    });

    let cli_log = dir.path().join("replay-cli.log");
    let mut cli = Command::new(projector_bin())
        .args(["replay", "order_summary", "--wait", "--config"])
        .arg(worker.config_path())
        .current_dir(repo_root())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&cli_log)?)
        .spawn()?;

    // While it runs: progress in the API and the metrics, a second request refused.
    let progress = wait_replay_progress(&worker, "order_summary", 1)?;
    let metrics = worker.metrics()?;
    let labels = [("projection", "order_summary"), ("generation", "2")];
    let ratio = metric_value(&metrics, "projector_replay_progress_ratio", &labels);
    ensure!(
        ratio.is_some_and(|r| r > 0.0 && r < 1.0),
        "progress ratio mid-replay: {ratio:?} ({progress})"
    );
    for name in [
        "projector_replay_events_per_second",
        "projector_replay_eta_seconds",
    ] {
        ensure!(
            metric_value(&metrics, name, &labels).is_some(),
            "{name} is exported"
        );
    }
    let (status, body) = worker.post("/projections/order_summary/replay", Some(TOKEN))?;
    ensure!(
        status == 409 && body["replay"]["generation"] == 2,
        "a second replay is refused with the running one's status: {status} {body}"
    );
    let (status, _) = worker.post("/projections/order_summary/replay", Some("wrong"))?;
    ensure!(status == 401, "a wrong token is refused: {status}");

    let mut exit = None;
    wait_until(
        "projector replay --wait to exit",
        Duration::from_secs(180),
        || {
            exit = cli.try_wait().ok().flatten();
            exit.is_some()
        },
    )
    .with_context(|| format!("worker log:\n{}", worker.service.log()))?;
    let mut stdout = String::new();
    std::io::Read::read_to_string(cli.stdout.as_mut().context("stdout")?, &mut stdout)?;
    ensure!(
        exit.is_some_and(|e| e.success()) && stdout.contains("generation 2 is live"),
        "projector replay --wait: {exit:?}\n{stdout}\n{}",
        std::fs::read_to_string(&cli_log)?
    );

    producer.wait_exit(Duration::from_secs(120))?;
    wait_for_oracle(&mut worker, &stream, Duration::from_secs(120))?;
    let report = reader.finish()?;
    ensure!(report.reads >= 100, "the reader read throughout: {report:?}");
    ensure!(
        report.violations.is_empty(),
        "{} bad reads of {}, e.g. {:?}",
        report.violations.len(),
        report.reads,
        &report.violations[..report.violations.len().min(5)]
    );

    let description = projection_body(&worker, "order_summary")?;
    ensure!(
        description["generation"] == 2
            && description["replay"].is_null()
            && description["last_replay"]["outcome"] == "switched",
        "after the switch: {description}"
    );
    let ratio = metric_value(&worker.metrics()?, "projector_replay_progress_ratio", &labels);
    ensure!(ratio == Some(1.0), "progress ratio after the switch: {ratio:?}");
    wait_column_families(&data, &["order_summary@2"], &["order_summary@1"])?;

    let status = Command::new(projector_bin())
        .args(["status", "--config"])
        .arg(worker.config_path())
        .current_dir(repo_root())
        .output()?;
    let table = String::from_utf8_lossy(&status.stdout);
    ensure!(
        status.status.success()
            && table
                .lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>()[..3] == ["order_summary", "g2", "live"]),
        "projector status:\n{table}"
    );
    Ok(())
}

#[test]
fn sigkill_during_a_replay_resumes_it_and_an_abort_leaves_the_live_generation_untouched() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Broker::start(dir.path())?;
    broker.create_topic("orders", 4)?;
    let registry = Registry::start(dir.path())?;
    let data = dir.path().join("data");
    let projections = order_summary_projections(&[("order_summary", "orders")]);
    let mut worker = Worker::start(
        dir.path(),
        &replay_config(&broker, &registry, &data, &projections, 2_000),
    )?;
    let stream = orders::generate("orders", 5_000, 12);
    produce(
        &broker,
        &registry,
        &write_events(dir.path(), "events.jsonl", &stream.lines)?,
    )?;
    wait_for_oracle(&mut worker, &stream, Duration::from_secs(120))?;

    let (status, body) = worker.post("/projections/order_summary/replay", Some(TOKEN))?;
    ensure!(
        status == 202 && body["replay"]["generation"] == 2,
        "{status} {body}"
    );
    let before_kill = wait_replay_progress(&worker, "order_summary", 4_000)?;
    println!("SIGKILL during the replay at {before_kill}");
    worker.restart(dir.path())?;

    // Generation 1 is intact and serving; the replay resumes where it was.
    let description = projection_body(&worker, "order_summary")?;
    ensure!(
        description["generation"] == 1 && description["replay"]["generation"] == 2,
        "after the restart: {description}"
    );
    assert_state_matches_oracle(&worker, &stream)?;
    let resumed = wait_replay_progress(&worker, "order_summary", 1)?;
    ensure!(
        resumed["applied"].as_i64() >= before_kill["applied"].as_i64(),
        "resumed from its checkpoint, not from 0: {resumed} after {before_kill}"
    );
    ensure!(worker.service.log().contains("resuming the replay"));
    wait_generation(&mut worker, "order_summary", 2)?;
    assert_state_matches_oracle(&worker, &stream)?;
    wait_column_families(&data, &["order_summary@2"], &["order_summary@1"])?;

    // Abort: the new generation is dropped, the live one never touched.
    let (status, body) = worker.post("/projections/order_summary/replay", Some(TOKEN))?;
    ensure!(
        status == 202 && body["replay"]["generation"] == 3,
        "{status} {body}"
    );
    wait_replay_progress(&worker, "order_summary", 1)?;
    let (status, body) = worker.delete("/projections/order_summary/replay", TOKEN)?;
    ensure!(status == 202 && body["aborting"] == 3, "{status} {body}");
    let mut description = Value::Null;
    wait_until("the abort to finish", Duration::from_secs(30), || {
        description = projection_body(&worker, "order_summary").unwrap_or(Value::Null);
        description["last_replay"] == json!({"generation": 3, "outcome": "aborted", "ended_at": description["last_replay"]["ended_at"]})
    })
    .with_context(|| format!("{description}"))?;
    ensure!(
        description["generation"] == 2 && description["replay"].is_null(),
        "{description}"
    );
    let (status, _) = worker.delete("/projections/order_summary/replay", TOKEN)?;
    ensure!(status == 404, "nothing left to abort: {status}");
    wait_column_families(&data, &["order_summary@2"], &["order_summary@3"])?;
    assert_state_matches_oracle(&worker, &stream)?;
    Ok(())
}

/// The first definition: per order, events counted.
const COUNTING: &str = r#"
[[projections]]
name = "order_activity"
topics = ["orders"]
[projections.declarative]
key = "event.orderId"
[[projections.declarative.on]]
event = "*"
count = ["events"]
"#;

/// The edited definition: counted under another name, and the customer.
const COUNTING_WITH_CUSTOMER: &str = r#"
[[projections]]
name = "order_activity"
topics = ["orders"]
[projections.declarative]
key = "event.orderId"
[[projections.declarative.on]]
event = "*"
count = ["seen"]
[[projections.declarative.on]]
event = "shop.orders.OrderPlaced"
set = { customer = "event.customerId" }
"#;

fn counting_oracle(lines: &[Value]) -> BTreeMap<String, Value> {
    let mut out: BTreeMap<String, Value> = BTreeMap::new();
    for line in lines {
        let state = out
            .entry(line["value"]["orderId"].as_str().expect("orderId").to_owned())
            .or_insert_with(|| json!({"events": 0}));
        state["events"] = json!(state["events"].as_i64().unwrap_or(0) + 1);
    }
    out
}

fn counting_with_customer_oracle(lines: &[Value]) -> BTreeMap<String, Value> {
    let mut out: BTreeMap<String, Value> = BTreeMap::new();
    for line in lines {
        let state = out
            .entry(line["value"]["orderId"].as_str().expect("orderId").to_owned())
            .or_insert_with(|| json!({"seen": 0}));
        state["seen"] = json!(state["seen"].as_i64().unwrap_or(0) + 1);
        if line["type"] == "OrderPlaced" {
            state["customer"] = line["value"]["customerId"].clone();
        }
    }
    out
}

#[test]
fn an_edited_declarative_projection_serves_its_old_logic_until_the_replay_switches() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Broker::start(dir.path())?;
    broker.create_topic("orders", 4)?;
    let registry = Registry::start(dir.path())?;
    let data = dir.path().join("data");
    let mut worker = Worker::start(
        dir.path(),
        &replay_config(&broker, &registry, &data, COUNTING, 3_000),
    )?;
    let stream = orders::generate("orders", 3_000, 13);
    let (first, second) = stream.lines.split_at(6_000);
    produce(
        &broker,
        &registry,
        &write_events(dir.path(), "first.jsonl", first)?,
    )?;
    wait_applied(
        &mut worker,
        "order_activity",
        first.len(),
        Duration::from_secs(120),
    )?;
    assert_matches(&worker, "order_activity", &counting_oracle(first))?;

    // Edit the config and restart: generation 1 keeps the definition it was built with.
    worker.service.signal("TERM")?;
    worker.service.wait_exit(Duration::from_secs(30))?;
    let config = std::fs::read_to_string(worker.config_path())?;
    std::fs::write(
        worker.config_path(),
        config.replace(COUNTING.trim(), COUNTING_WITH_CUSTOMER.trim()),
    )?;
    worker.restart(dir.path())?;
    let description = projection_body(&worker, "order_activity")?;
    ensure!(
        description["generation"] == 1 && description["definition_matches_config"] == false,
        "{description}"
    );
    produce(
        &broker,
        &registry,
        &write_events(dir.path(), "second.jsonl", second)?,
    )?;
    wait_applied(
        &mut worker,
        "order_activity",
        stream.lines.len(),
        Duration::from_secs(120),
    )?;
    assert_matches(&worker, "order_activity", &counting_oracle(&stream.lines))?;

    let keys: Vec<String> = counting_oracle(first).keys().step_by(20).cloned().collect();
    let reader = spawn_reader(worker.url(), "order_activity", keys, |key, _, status, body| {
        (status != 200).then(|| format!("{key}: {status} {body}"))
    });
    let (status, body) = worker.post("/projections/order_activity/replay", Some(TOKEN))?;
    ensure!(status == 202, "{status} {body}");
    wait_generation(&mut worker, "order_activity", 2)?;
    let report = reader.finish()?;

    assert_matches(
        &worker,
        "order_activity",
        &counting_with_customer_oracle(&stream.lines),
    )?;
    let description = projection_body(&worker, "order_activity")?;
    ensure!(description["definition_matches_config"] == true, "{description}");
    ensure!(
        report.violations.is_empty(),
        "bad reads: {:?}",
        &report.violations[..report.violations.len().min(5)]
    );
    ensure!(
        report.shapes == ["old", "new"],
        "readers saw the old logic, then only the new one: {:?} over {} reads",
        report.shapes,
        report.reads
    );
    wait_column_families(&data, &["order_activity@2"], &["order_activity@1"])?;
    Ok(())
}
