//! The shared-source variant of the bench: 1, 4 and 12 `order_summary`
//! projections (under different names) over the same topic, each set in a fresh
//! worker from offset 0 until every projection has applied every event: the time
//! that takes (from the first committed batch), the topic's events per second,
//! the worker's peak RSS and its most threads.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use projector_tests::{worker_config, Broker, Registry, Worker};
use serde_json::{json, Value};

/// The projection counts measured.
pub const COUNTS: [usize; 3] = [1, 4, 12];

/// One row per projection count (`BENCH_SHARED_COUNTS=12` measures that one
/// only, for profiling).
pub fn measure(dir: &Path, broker: &Broker, registry: &Registry, topic: &str, total: i64) -> Result<Value> {
    let counts: Vec<usize> = match std::env::var("BENCH_SHARED_COUNTS") {
        Ok(list) => list.split(',').filter_map(|c| c.trim().parse().ok()).collect(),
        Err(_) => COUNTS.to_vec(),
    };
    let mut rows = Vec::new();
    for count in counts {
        let projections: String = (1..=count)
            .map(|i| {
                format!("[[projections]]\nname = \"summary_{i}\"\nkind = \"order_summary\"\ntopics = [\"{topic}\"]\n")
            })
            .collect();
        let home = dir.join(format!("shared-{count}"));
        std::fs::create_dir_all(&home)?;
        let config = worker_config(broker, registry, &home.join("data"), &projections)
            .replace("batch_max_wait_ms = 50\n", "");
        let mut worker = Worker::start(&home, &config)?;
        let deadline = Instant::now() + Duration::from_secs(900);
        let mut start: Option<Instant> = None;
        let mut threads = 0u64;
        let seconds = loop {
            worker.service.check_alive()?;
            ensure!(
                Instant::now() < deadline,
                "{count} projections: not caught up in 900 s"
            );
            threads = threads.max(status_number(&worker, "Threads:").unwrap_or(0));
            let applied = applied_per_projection(&worker).unwrap_or_default();
            if start.is_none() && applied.iter().any(|a| *a > 0) {
                start = Some(Instant::now());
            }
            if applied.len() == count && applied.iter().all(|a| *a >= total) {
                break start.context("set on the way")?.elapsed().as_secs_f64();
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let rss_mb = status_number(&worker, "VmHWM:").unwrap_or(0) as f64 / 1024.0;
        eprintln!(
            "{count} projections over `{topic}`: {seconds:.2} s, {rss_mb:.0} MB peak RSS, {threads} threads"
        );
        rows.push(json!({
            "projections": count,
            "seconds": seconds,
            "topic_events_per_second": total as f64 / seconds.max(1e-9),
            "peak_rss_mb": rss_mb,
            "threads": threads,
        }));
        worker.service.kill();
    }
    let first = &rows[0];
    let last = &rows[rows.len() - 1];
    let ratio =
        |field: &str| last[field].as_f64().unwrap_or(0.0) / first[field].as_f64().unwrap_or(1.0).max(1e-9);
    Ok(json!({
        "rows": rows,
        "time_12_vs_1": ratio("seconds"),
        "rss_12_vs_1": ratio("peak_rss_mb"),
    }))
}

/// Committed offsets of every projection, from one `GET /projections`.
fn applied_per_projection(worker: &Worker) -> Result<Vec<i64>> {
    let (status, body) = worker.get("/projections")?;
    ensure!(status == 200, "GET /projections: {status}");
    Ok(body["projections"]
        .as_array()
        .context("projections")?
        .iter()
        .map(|p| {
            p["offsets"]
                .as_object()
                .map(|o| o.values().filter_map(Value::as_i64).sum())
                .unwrap_or(0)
        })
        .collect())
}

/// A number from the worker's `/proc/<pid>/status` (`VmHWM:` in kB, `Threads:`).
fn status_number(worker: &Worker, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", worker.service.pid())).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The table's lines.
pub fn print(shared: &Value) {
    println!("projections over one topic   seconds   topic events/s   peak RSS MB   threads");
    for row in shared["rows"].as_array().into_iter().flatten() {
        println!(
            "{:<28} {:>7.2} {:>16.0} {:>13.0} {:>9}",
            row["projections"],
            row["seconds"].as_f64().unwrap_or(0.0),
            row["topic_events_per_second"].as_f64().unwrap_or(0.0),
            row["peak_rss_mb"].as_f64().unwrap_or(0.0),
            row["threads"]
        );
    }
    println!(
        "12 vs 1: time {:.2}x (target <= 3), peak RSS {:.2}x (target <= 2)",
        shared["time_12_vs_1"].as_f64().unwrap_or(0.0),
        shared["rss_12_vs_1"].as_f64().unwrap_or(0.0)
    );
}
