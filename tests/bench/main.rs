//! `make bench`: Projector side by side with raw consumption and a peer, in one
//! run on one broker and one pre-produced data set.
//!
//! Starts Tansu and the registry, produces the order events once (Confluent's
//! Python client, a share of them OrderPlaced v1 that Projector upcasts), then
//! measures: a bare rdkafka consumer that only counts (three times: before,
//! between and after the contenders; ratios divide by the best); Projector folding
//! `order_summary`, a declarative projection and `revenue_by_day` from offset 0
//! (each in a fresh worker), a replay of `order_summary`; Quix Streams folding the
//! same events; 1, 4 and 12 projections over the topic in one worker
//! ([`shared`]); and, on a second topic, the freshness of a live projection under
//! a steady producer (`live_producer`, rdkafka in this process). Prints a table
//! and writes it as JSON.
//!
//! Rates are timed from the first committed batch (or message) to the last, so
//! process start and group join are left out of every contender alike.

mod live_producer;
mod shared;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use projector_tests::{
    orders, produce_command, python, repo_root, run_to_completion, worker_config, write_events, Broker,
    Registry, Worker,
};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{json, Value};

const TOKEN: &str = "bench-admin-token";
const PARTITIONS: i32 = 8;

struct Settings {
    events: usize,
    quix_events: usize,
    live_seconds: u32,
    live_rate: u32,
    output: PathBuf,
}

impl Settings {
    fn from_env() -> Result<Settings> {
        let number = |name: &str, default: usize| -> Result<usize> {
            std::env::var(name)
                .ok()
                .map(|v| v.parse().with_context(|| format!("{name}={v}")))
                .transpose()
                .map(|v| v.unwrap_or(default))
        };
        Ok(Settings {
            events: number("BENCH_EVENTS", 1_000_000)?,
            quix_events: number("BENCH_QUIX_EVENTS", 100_000)?,
            live_seconds: number("BENCH_LIVE_SECONDS", 60)? as u32,
            live_rate: number("BENCH_LIVE_RATE", 50_000)? as u32,
            output: std::env::var_os("BENCH_OUTPUT")
                .map(PathBuf::from)
                .unwrap_or_else(|| repo_root().join("bench-results.json")),
        })
    }
}

fn main() -> Result<()> {
    let settings = Settings::from_env()?;
    let dir = tempfile::tempdir()?;
    let broker = Broker::start(dir.path())?;
    broker.create_topic("bench", PARTITIONS as u32)?;
    broker.create_topic("live", PARTITIONS as u32)?;
    broker.create_topic("live-seed", PARTITIONS as u32)?;
    let registry = Registry::start(dir.path())?;
    // OrderPlaced v1 and v3 are not BACKWARD compatible (v1 is upcast by a rule).
    projector_tests::set_compatibility(&registry, "NONE")?;

    let mut stream = orders::generate("bench", settings.events / 4, 7);
    orders::mix_versions(&mut stream, 7);
    let total = stream.lines.len() as i64;
    let events_file = write_events(dir.path(), "bench.jsonl", &stream.lines)?;
    eprintln!("producing {total} events...");
    let produced = Instant::now();
    run_to_completion(produce_command(&broker, &registry, &events_file, 0))?;
    eprintln!("produced in {:.1} s", produced.elapsed().as_secs_f64());

    if std::env::var("BENCH_ONLY").is_ok_and(|only| only == "live") {
        let live = live_freshness(dir.path(), &broker, &registry, &settings)?;
        let lags = &live.lag_samples;
        println!(
            "live: p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms; lag samples {lags:?}",
            live.p50_ms, live.p99_ms, live.p999_ms
        );
        return Ok(());
    }
    if std::env::var("BENCH_ONLY").is_ok_and(|only| only == "shared") {
        let shared = shared::measure(dir.path(), &broker, &registry, "bench", total)?;
        shared::print(&shared);
        return Ok(());
    }
    if std::env::var("BENCH_ONLY").is_ok_and(|only| only == "rss") {
        // The peak-RSS variant: `BENCH_EVENTS=4000000` is 1,000,000 orders.
        let mut summary = fresh_worker(
            dir.path(),
            "order_summary",
            &broker,
            &registry,
            &builtin("order_summary"),
        )?;
        let rate = summary.fold_rate("order_summary", total)?;
        println!(
            "order_summary over {} orders ({total} events): {rate:.0} events/s, peak RSS {:.0} MB",
            stream.placed.len(),
            summary.peak_rss_mb()?
        );
        return Ok(());
    }
    if let Some(binaries) = std::env::var_os("BENCH_AB") {
        return compare_builds(dir.path(), &broker, &registry, total, &binaries);
    }

    let mut results = BTreeMap::new();
    // Raw consumption swings widely on a shared machine: it is measured before,
    // between and after the contenders, and every ratio divides by the best run.
    let mut raw_runs = vec![raw_consume(&broker, "bench", total)?];
    eprintln!("raw consume: {:.0} events/s", raw_runs[0]);

    let mut summary = fresh_worker(
        dir.path(),
        "order_summary",
        &broker,
        &registry,
        &builtin("order_summary"),
    )?;
    let fresh = summary.fold_rate("order_summary", total)?;
    eprintln!("order_summary first run: {fresh:.0} events/s");
    let replay = summary.replay_rate("order_summary", total)?;
    eprintln!("order_summary replay: {replay:.0} events/s");
    results.insert(
        "order_summary",
        json!({ "events_per_second": fresh, "peak_rss_mb": summary.peak_rss_mb()?, "keys": stream.placed.len() }),
    );
    results.insert("order_summary_replay", json!({ "events_per_second": replay }));
    drop(summary);
    raw_runs.push(raw_consume(&broker, "bench", total)?);
    eprintln!("raw consume: {:.0} events/s", raw_runs[1]);

    for (name, projections) in [
        (
            "customer_stats",
            projector_tests::read_models::customer_stats_projection("bench"),
        ),
        ("revenue_by_day", builtin("revenue_by_day")),
    ] {
        let mut worker = fresh_worker(dir.path(), name, &broker, &registry, &projections)?;
        let rate = worker.fold_rate(name, total)?;
        eprintln!("{name}: {rate:.0} events/s");
        results.insert(
            name,
            json!({ "events_per_second": rate, "peak_rss_mb": worker.peak_rss_mb()? }),
        );
    }

    raw_runs.push(raw_consume(&broker, "bench", total)?);
    eprintln!("raw consume: {:.0} events/s", raw_runs[2]);
    let raw = raw_runs.iter().copied().fold(0.0, f64::max);
    results.insert(
        "raw_consume",
        json!({ "events_per_second": raw, "runs": raw_runs }),
    );

    let shared = shared::measure(dir.path(), &broker, &registry, "bench", total)?;
    results.insert("shared_source", shared);

    let quix = quix_fold(&broker, &registry, settings.quix_events)?;
    eprintln!("quix streams: {quix:.0} events/s");
    results.insert(
        "quix_streams",
        json!({ "events_per_second": quix, "events": settings.quix_events }),
    );

    let live = live_freshness(dir.path(), &broker, &registry, &settings)?;
    results.insert(
        "live",
        json!({
            "rate": settings.live_rate,
            "achieved_rate": live.events as f64 / f64::from(settings.live_seconds),
            "seconds": settings.live_seconds,
            "freshness_p50_ms": live.p50_ms,
            "freshness_p99_ms": live.p99_ms,
            "freshness_p999_ms": live.p999_ms,
            "lag_events_samples": live.lag_samples,
        }),
    );

    let rate = |name: &str| results[name]["events_per_second"].as_f64().unwrap_or(0.0);
    let report = json!({
        "date": chrono_date(),
        "machine": machine(),
        "events": total,
        "partitions": PARTITIONS,
        "results": results,
        "ratios": {
            "order_summary_vs_raw": rate("order_summary") / raw,
            "order_summary_replay_vs_raw": rate("order_summary_replay") / raw,
            "order_summary_replay_vs_first_run": rate("order_summary_replay") / rate("order_summary"),
            "declarative_vs_raw": rate("customer_stats") / raw,
            "revenue_by_day_vs_raw": rate("revenue_by_day") / raw,
            "order_summary_vs_quix": rate("order_summary") / quix,
        },
    });
    print_table(&report);
    std::fs::write(&settings.output, serde_json::to_string_pretty(&report)? + "\n")?;
    eprintln!("written to {}", settings.output.display());
    Ok(())
}

/// `BENCH_AB=<projector A>:<projector B>`: the first runs of the bench
/// (`order_summary` and `customer_stats` from offset 0) for two builds,
/// alternating on the same broker and data (`BENCH_AB_ROUNDS` rounds, default 3),
/// so a change is measured against the machine's drift rather than across runs.
fn compare_builds(
    dir: &Path,
    broker: &Broker,
    registry: &Registry,
    total: i64,
    binaries: &std::ffi::OsStr,
) -> Result<()> {
    let binaries: Vec<PathBuf> = std::env::split_paths(binaries).collect();
    ensure!(
        binaries.len() == 2,
        "BENCH_AB names two binaries separated by ':'"
    );
    let rounds = std::env::var("BENCH_AB_ROUNDS")
        .ok()
        .map(|v| v.parse::<usize>().with_context(|| format!("BENCH_AB_ROUNDS={v}")))
        .transpose()?
        .unwrap_or(3);
    let projections = [
        ("order_summary", builtin("order_summary")),
        (
            "customer_stats",
            projector_tests::read_models::customer_stats_projection("bench"),
        ),
    ];
    let mut rates: BTreeMap<(&str, usize), Vec<f64>> = BTreeMap::new();
    for round in 0..rounds {
        eprintln!(
            "raw consume: {:.0} events/s",
            raw_consume(broker, "bench", total)?
        );
        for (name, config) in &projections {
            for (which, binary) in binaries.iter().enumerate() {
                let home = dir.join(format!("ab-{round}-{name}-{which}"));
                std::fs::create_dir_all(&home)?;
                let config = worker_config(broker, registry, &home.join("data"), config)
                    .replace("batch_max_wait_ms = 50\n", "");
                let mut worker = BenchWorker {
                    worker: Worker::start_binary(&home, &config, binary)?,
                };
                let rate = worker.fold_rate(name, total)?;
                eprintln!(
                    "{name} {}: {rate:.0} events/s, peak RSS {:.0} MB",
                    binary.display(),
                    worker.peak_rss_mb()?
                );
                rates.entry((name, which)).or_default().push(rate);
            }
        }
    }
    for ((name, which), runs) in &rates {
        let best = runs.iter().copied().fold(0.0, f64::max);
        println!(
            "{name:<16} {:<50} best {best:>10.0}  runs {runs:.0?}",
            binaries[*which].display()
        );
    }
    Ok(())
}

fn builtin(kind: &str) -> String {
    format!("[[projections]]\nname = \"{kind}\"\nkind = \"{kind}\"\ntopics = [\"bench\"]\n")
}

/// A bare consumer that only counts: every partition assigned at the beginning.
fn raw_consume(broker: &Broker, topic: &str, total: i64) -> Result<f64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.address())
        .set("group.id", "bench-raw")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let deadline = Instant::now() + Duration::from_secs(300);
    let (mut count, mut first) = (0i64, None);
    while count < total {
        ensure!(
            Instant::now() < deadline,
            "raw consume: {count} of {total} in 300 s"
        );
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(_)) => {
                first.get_or_insert_with(Instant::now);
                count += 1;
            }
            Some(Err(e)) => bail!("raw consume: {e}"),
            None => {}
        }
    }
    let seconds = first.map(|f| f.elapsed().as_secs_f64()).unwrap_or(0.0);
    Ok((count - 1) as f64 / seconds.max(1e-9))
}

/// A worker with its own data directory.
struct BenchWorker {
    worker: Worker,
}

fn fresh_worker(
    dir: &Path,
    name: &str,
    broker: &Broker,
    registry: &Registry,
    projections: &str,
) -> Result<BenchWorker> {
    let home = dir.join(name);
    std::fs::create_dir_all(&home)?;
    let config = worker_config(broker, registry, &home.join("data"), projections)
        .replace("[http]\n", &format!("[http]\nadmin_token = \"{TOKEN}\"\n"))
        .replace("batch_max_wait_ms = 50\n", "");
    Ok(BenchWorker {
        worker: Worker::start(&home, &config)?,
    })
}

impl BenchWorker {
    /// Polls `read` (events done so far) until it reaches `total`; the rate from
    /// the first change to the end.
    fn rate_of(
        &mut self,
        what: &str,
        total: i64,
        mut read: impl FnMut(&Worker) -> Result<i64>,
    ) -> Result<f64> {
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut start: Option<(Instant, i64)> = None;
        loop {
            self.worker.service.check_alive()?;
            ensure!(Instant::now() < deadline, "{what}: not done in 600 s");
            let done = read(&self.worker).unwrap_or(0);
            if done > 0 && start.is_none() {
                start = Some((Instant::now(), done));
            }
            if done >= total {
                let (at, from) = start.expect("set on the way");
                return Ok((total - from) as f64 / at.elapsed().as_secs_f64().max(1e-9));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn fold_rate(&mut self, name: &str, total: i64) -> Result<f64> {
        self.rate_of(name, total, |w| w.applied_offsets(name))
    }

    fn replay_rate(&mut self, name: &str, total: i64) -> Result<f64> {
        let (status, body) = self
            .worker
            .post(&format!("/projections/{name}/replay"), Some(TOKEN))?;
        ensure!(status == 202, "starting the replay: {status} {body}");
        self.rate_of("replay", total, |w| {
            let projection = w.projection(name)?;
            if projection["generation"] == 2 {
                return Ok(total);
            }
            Ok(projection["replay"]["events_committed"].as_i64().unwrap_or(0))
        })
    }

    /// The worker's peak resident memory.
    fn peak_rss_mb(&self) -> Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.worker.service.pid()))?;
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("VmHWM in /proc/<pid>/status")?;
        Ok(kb / 1024.0)
    }
}

fn quix_fold(broker: &Broker, registry: &Registry, events: usize) -> Result<f64> {
    let output = std::process::Command::new(python())
        .arg(repo_root().join("tests/python/quix_fold.py"))
        .args(["--brokers", &broker.address(), "--registry", &registry.url()])
        .args(["--topic", "bench", "--events", &events.to_string()])
        .output()?;
    ensure!(
        output.status.success(),
        "quix_fold.py: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let result: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .with_context(|| format!("quix_fold.py printed: {stdout}"))?;
    result["events_per_second"].as_f64().context("events_per_second")
}

/// What the live phase measured.
struct Live {
    events: i64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    /// Lag in events, sampled every second while the producer ran.
    lag_samples: Vec<i64>,
}

/// A worker folding `order_summary` live while the bench's producer writes at a
/// steady rate (see `live_producer`); p50, p99 and p99.9 of the time from record
/// timestamp to commit, in ms, from the worker's freshness histogram, and its lag
/// every second of the run.
fn live_freshness(dir: &Path, broker: &Broker, registry: &Registry, settings: &Settings) -> Result<Live> {
    let home = dir.join("live");
    std::fs::create_dir_all(&home)?;
    // Serialized once by Confluent's client onto a seed topic (schema ids are per
    // schema, not per subject, so the bytes decode the same on the live topic).
    let stream = orders::generate("live-seed", 50_000, 8);
    let file = write_events(&home, "live.jsonl", &stream.lines)?;
    let recorded = home.join("live-recorded.jsonl");
    let mut seed = produce_command(broker, registry, &file, 0);
    seed.arg("--record").arg(&recorded);
    run_to_completion(seed)?;
    let records = live_producer::read_recorded(&recorded)?;

    let projections = "[[projections]]\nname = \"live\"\nkind = \"order_summary\"\ntopics = [\"live\"]\n";
    let config = worker_config(broker, registry, &home.join("data"), projections)
        .replace("batch_max_wait_ms = 50", "batch_max_wait_ms = 20");
    let mut worker = Worker::start(&home, &config)?;
    projector_tests::wait_until("the live worker to be ready", Duration::from_secs(60), || {
        worker.get("/readyz").is_ok_and(|(s, _)| s == 200)
    })?;
    eprintln!(
        "live: {} events/s for {} s...",
        settings.live_rate, settings.live_seconds
    );
    let brokers = broker.address();
    let (rate, seconds) = (settings.live_rate, settings.live_seconds);
    let producer = std::thread::spawn(move || {
        live_producer::produce_steadily(&brokers, "live", &records, rate, seconds)
    });
    let mut lag_samples = Vec::new();
    while !producer.is_finished() {
        std::thread::sleep(Duration::from_secs(1));
        if let Ok(projection) = worker.projection("live") {
            lag_samples.push(projection["lag"]["events"].as_i64().unwrap_or(-1));
        }
    }
    let sent = producer
        .join()
        .map_err(|_| anyhow::anyhow!("the live producer panicked"))??;
    projector_tests::wait_until("the live worker to catch up", Duration::from_secs(120), || {
        worker.applied_offsets("live").is_ok_and(|n| n >= sent as i64)
    })?;
    worker.service.check_alive()?;
    let metrics = worker.metrics()?;
    let buckets = histogram(&metrics, "projector_event_freshness_seconds_bucket", "live");
    ensure!(!buckets.is_empty(), "no freshness histogram in /metrics");
    Ok(Live {
        events: worker.applied_offsets("live")?,
        p50_ms: quantile(&buckets, 0.5) * 1000.0,
        p99_ms: quantile(&buckets, 0.99) * 1000.0,
        p999_ms: quantile(&buckets, 0.999) * 1000.0,
        lag_samples,
    })
}

/// The cumulative buckets (upper bound, count) of one histogram series.
fn histogram(exposition: &str, name: &str, projection: &str) -> Vec<(f64, f64)> {
    let label = format!("projection=\"{projection}\"");
    let mut buckets: Vec<(f64, f64)> = exposition
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(&label))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((bound, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// The `q` quantile of cumulative buckets, interpolated linearly inside a bucket
/// (as Prometheus' `histogram_quantile`).
fn quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let total = buckets.last().map(|b| b.1).unwrap_or(0.0);
    let rank = q * total;
    let mut previous = (0.0, 0.0);
    for &(bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                return previous.0;
            }
            let share = if count > previous.1 {
                (rank - previous.1) / (count - previous.1)
            } else {
                0.0
            };
            return previous.0 + (bound - previous.0) * share;
        }
        previous = (bound, count);
    }
    previous.0
}

fn print_table(report: &Value) {
    let results = &report["results"];
    let ratios = &report["ratios"];
    println!(
        "\n{} events in {} partitions, {}; {}",
        report["events"], report["partitions"], report["date"], report["machine"]
    );
    println!(
        "raw consume runs (best is the baseline): {}",
        results["raw_consume"]["runs"]
    );
    println!("{:<34} {:>12} {:>10}", "contender", "events/s", "vs raw");
    let raw = results["raw_consume"]["events_per_second"]
        .as_f64()
        .unwrap_or(1.0);
    for (label, key) in [
        ("raw rdkafka consume (count only)", "raw_consume"),
        ("order_summary, first run", "order_summary"),
        ("order_summary, replay", "order_summary_replay"),
        ("declarative customer_stats", "customer_stats"),
        ("revenue_by_day (across partitions)", "revenue_by_day"),
        ("Quix Streams 3.28, same fold", "quix_streams"),
    ] {
        let rate = results[key]["events_per_second"].as_f64().unwrap_or(0.0);
        println!("{label:<34} {rate:>12.0} {:>10.2}", rate / raw);
    }
    println!(
        "order_summary vs Quix Streams: {:.0}x; replay vs first run: {:.2}",
        ratios["order_summary_vs_quix"].as_f64().unwrap_or(0.0),
        ratios["order_summary_replay_vs_first_run"]
            .as_f64()
            .unwrap_or(0.0)
    );
    println!(
        "live at {} events/s (achieved {:.0}) for {} s: freshness p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms",
        results["live"]["rate"],
        results["live"]["achieved_rate"].as_f64().unwrap_or(0.0),
        results["live"]["seconds"],
        results["live"]["freshness_p50_ms"].as_f64().unwrap_or(0.0),
        results["live"]["freshness_p99_ms"].as_f64().unwrap_or(0.0),
        results["live"]["freshness_p999_ms"].as_f64().unwrap_or(0.0)
    );
    let lags: Vec<i64> = results["live"]["lag_events_samples"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_i64).collect())
        .unwrap_or_default();
    let half = lags.len() / 2;
    let mean = |l: &[i64]| l.iter().sum::<i64>() as f64 / l.len().max(1) as f64;
    println!(
        "live lag (events, sampled each second): max {}, mean of first half {:.0}, of second half {:.0}",
        lags.iter().max().unwrap_or(&0),
        mean(&lags[..half]),
        mean(&lags[half..])
    );
    println!(
        "peak RSS: order_summary {:.0} MB ({} keys), customer_stats {:.0} MB, revenue_by_day {:.0} MB",
        results["order_summary"]["peak_rss_mb"].as_f64().unwrap_or(0.0),
        results["order_summary"]["keys"],
        results["customer_stats"]["peak_rss_mb"].as_f64().unwrap_or(0.0),
        results["revenue_by_day"]["peak_rss_mb"].as_f64().unwrap_or(0.0)
    );
    shared::print(&results["shared_source"]);
}

fn chrono_date() -> String {
    chrono::Utc::now().format("%Y-%m-%d").to_string()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    format!("{cores} cores, {cpu}")
}
