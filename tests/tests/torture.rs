//! Crash torture: a producer writes throughout while the worker is SIGKILLed at 20
//! seeded moments: mid-batch, right after a commit, while a second worker joins
//! or leaves its group (a rebalance), and while a replay folds or hands over.
//! After each kill the worker is restarted on the same data. In the end every key
//! equals the oracle: nothing lost, nothing applied twice (an order's `version`
//! counts its events), for both of two projections that fold in a shared source.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use projector_tests::orders;
use projector_tests::{
    assert_matches, order_summary_projections, produce_command, wait_applied, wait_for_oracle, wait_until,
    worker_config, write_events, Broker, Registry, Service, Worker,
};
use rand::Rng;

const TOKEN: &str = "torture-admin-token";
const KILLS: usize = 20;

/// Where in the worker's life a kill lands.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Moment {
    /// A random instant while it folds.
    MidStream,
    /// Just after its committed offsets moved: inside the next fold/commit cycle.
    AfterCommit,
    /// While a second worker joins the group (or, when one is there, leaves it).
    Rebalance,
    /// While a replay of the projection runs (folding or handing over).
    Replay,
}

fn start_worker(home: &std::path::Path, broker: &Broker, registry: &Registry) -> Result<Worker> {
    // Two projections over one topic: they fold in a shared source (the replay's
    // generation on its own until it joins).
    let projections = order_summary_projections(&[("order_summary", "orders"), ("summary_shared", "orders")]);
    let config = worker_config(broker, registry, &home.join("data"), &projections)
        .replace("[http]\n", &format!("[http]\nadmin_token = \"{TOKEN}\"\n"));
    Worker::start(home, &config)
}

/// Committed events of the live generation; 0 when the worker does not answer.
fn applied(worker: &Worker) -> i64 {
    worker.applied_offsets("order_summary").unwrap_or(0)
}

fn replay_running(worker: &Worker) -> bool {
    worker
        .projection("order_summary")
        .is_ok_and(|p| !p["replay"].is_null())
}

#[test]
fn twenty_sigkills_at_seeded_moments_lose_nothing_and_apply_nothing_twice() -> Result<()> {
    let mut rng = projector_tests::seeded_rng("torture");
    let mut moments: Vec<Moment> = [
        [Moment::MidStream; 8].as_slice(),
        &[Moment::AfterCommit; 4],
        &[Moment::Rebalance; 4],
        &[Moment::Replay; 4],
    ]
    .concat();
    // A seeded Fisher-Yates shuffle, so the kinds interleave.
    for i in (1..moments.len()).rev() {
        moments.swap(i, rng.random_range(0..=i));
    }
    assert_eq!(moments.len(), KILLS);

    let dir = tempfile::tempdir()?;
    let broker = Broker::start(dir.path())?;
    broker.create_topic("orders", 4)?;
    let registry = Registry::start(dir.path())?;
    let (home_a, home_b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&home_a)?;
    std::fs::create_dir_all(&home_b)?;
    let mut worker = start_worker(&home_a, &broker, &registry)?;
    let mut second: Option<Worker> = None;

    // About 120,000 events at 360/s: 5.5 minutes, longer than the 20 kill cycles
    // take here (180-250 s, each waiting out a group join), so every kill lands
    // while the producer writes.
    let stream = orders::generate("orders", 30_000, rng.random_range(0..10_000));
    let events = write_events(dir.path(), "events.jsonl", &stream.lines)?;
    let mut producer = Service::start(
        "producer",
        produce_command(&broker, &registry, &events, 360),
        &dir.path().join("producer.log"),
    )?;
    let started = Instant::now();
    for (kill, moment) in moments.iter().enumerate() {
        // Each kill waits until the restarted worker folds again.
        let before = applied(&worker);
        wait_until(
            &format!("kill {kill}: the worker to fold past {before}"),
            Duration::from_secs(90),
            || applied(&worker) > before,
        )
        .with_context(|| worker.service.log())?;
        let what = match moment {
            Moment::MidStream => {
                std::thread::sleep(Duration::from_millis(rng.random_range(0..800)));
                "mid-stream".to_owned()
            }
            Moment::AfterCommit => {
                let seen = applied(&worker);
                wait_until("a commit", Duration::from_secs(30), || applied(&worker) != seen)?;
                std::thread::sleep(Duration::from_micros(rng.random_range(0..50_000)));
                "just after a commit".to_owned()
            }
            Moment::Rebalance => {
                let (what, delay) = match second.take() {
                    None => {
                        second = Some(start_worker(&home_b, &broker, &registry)?);
                        ("while a second worker joins", rng.random_range(0..3_000))
                    }
                    Some(mut other) => {
                        other.service.kill();
                        // Its partitions move back once its session (6 s) expires.
                        (
                            "while a second worker's partitions come back",
                            rng.random_range(4_000..8_000),
                        )
                    }
                };
                let delay = Duration::from_millis(delay);
                std::thread::sleep(delay);
                format!("{what} (+{} ms)", delay.as_millis())
            }
            Moment::Replay => {
                if !replay_running(&worker) {
                    let (status, body) = worker.post("/projections/order_summary/replay", Some(TOKEN))?;
                    ensure!(status == 202 || status == 409, "replay request: {status} {body}");
                }
                let delay = Duration::from_millis(rng.random_range(0..2_500));
                std::thread::sleep(delay);
                let phase = worker
                    .projection("order_summary")
                    .map(|p| p["replay"]["phase"].clone())
                    .unwrap_or_default();
                format!("during a replay (+{} ms, phase {phase})", delay.as_millis())
            }
        };
        println!(
            "kill {kill:2} at {:5.1} s, {what}, {} events committed",
            started.elapsed().as_secs_f64(),
            applied(&worker)
        );
        worker.restart(&home_a)?;
    }
    println!("{KILLS} kills in {:.0} s", started.elapsed().as_secs_f64());
    if let Some(mut other) = second.take() {
        other.service.kill();
    }
    ensure!(
        producer.check_alive().is_ok(),
        "the producer was still writing at the last kill"
    );
    let status = producer.wait_exit(Duration::from_secs(300))?;
    ensure!(status.success(), "producer failed: {}", producer.log());
    wait_until("every replay to switch or end", Duration::from_secs(180), || {
        !replay_running(&worker)
    })?;
    wait_for_oracle(&mut worker, &stream, Duration::from_secs(180))?;
    wait_applied(
        &mut worker,
        "summary_shared",
        stream.lines.len(),
        Duration::from_secs(180),
    )?;
    assert_matches(&worker, "summary_shared", &orders::oracle(&stream.lines))
}
