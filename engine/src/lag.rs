//! Consumer lag, in events and in seconds, refreshed on a timer so a stalled
//! projection shows growing lag even when nothing arrives.
//!
//! Lag is measured against the offsets stored with state (the truth), not the
//! group's committed offsets: events = high watermark − next offset to apply;
//! seconds = age of the oldest event not yet applied (its record timestamp, when
//! the fold loop has seen it; otherwise how long the lag has been there), 0 when
//! caught up.
//!
//! The same refresh measures each running replay's progress against the high
//! watermarks, which decides when it hands over (see [`crate::replay`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tracing::debug;

use crate::config::KafkaConfig;
use crate::metrics;
use crate::replay::Replay;
use crate::runtime::ProjectionRuntime;
use crate::store::{SourcePartition, Store};

/// Total lag in events and the largest lag in seconds of each projection, as of
/// the last refresh (for summaries such as the demo's).
static SUMMARY: LazyLock<Mutex<HashMap<String, (i64, f64)>>> = LazyLock::new(Default::default);

/// The projection's total lag in events and largest lag in seconds.
pub fn summary(projection: &str) -> (i64, f64) {
    SUMMARY
        .lock()
        .expect("summary lock")
        .get(projection)
        .copied()
        .unwrap_or((0, 0.0))
}

/// How often lag is refreshed.
pub const REFRESH: Duration = Duration::from_secs(2);

/// Brokers silent this long make the worker unready.
const SILENT_AFTER: Duration = Duration::from_secs(6);

/// When the brokers last answered a watermark query; `None` before the first.
static BROKERS_ANSWERED: LazyLock<Mutex<Option<Instant>>> = LazyLock::new(Default::default);

/// How long the brokers have not answered the lag monitor, once that is longer
/// than a few refreshes (a stalled or unreachable cluster); `None` otherwise.
pub fn brokers_silent_for() -> Option<Duration> {
    let answered = (*BROKERS_ANSWERED.lock().expect("answered lock"))?;
    let silent = answered.elapsed();
    (silent > SILENT_AFTER).then_some(silent)
}

/// What the monitor remembers between refreshes.
#[derive(Default)]
struct Memory {
    /// Since when each lagging partition has lagged.
    lagging_since: HashMap<(String, SourcePartition), Instant>,
    /// The lag in seconds last published per partition.
    published: HashMap<(String, SourcePartition), f64>,
}

/// Starts the lag monitor on its own thread; it stops when `shutdown` is set.
pub fn spawn(
    kafka: &KafkaConfig,
    switch_lag_events: i64,
    store: Arc<Store>,
    projections: Vec<Arc<ProjectionRuntime>>,
    shutdown: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, rdkafka::error::KafkaError> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &kafka.brokers);
    for (key, value) in &kafka.librdkafka_options {
        config.set(key, value);
    }
    // Only metadata and watermark queries: no group, no subscription.
    config.remove("group.id");
    let client: BaseConsumer = config.create()?;
    Ok(std::thread::Builder::new()
        .name("lag-monitor".into())
        .spawn(move || {
            let mut memory = Memory::default();
            while !shutdown.load(Ordering::Relaxed) {
                for projection in &projections {
                    refresh(&client, &store, projection, &mut memory);
                    if let Some(replay) = projection.replay() {
                        refresh_replay(&client, &store, &replay, switch_lag_events);
                    }
                }
                let deadline = Instant::now() + REFRESH;
                while Instant::now() < deadline && !shutdown.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        })
        .expect("spawning a thread"))
}

/// The (low, high) watermarks of every partition of `topics`; `None` when the
/// brokers did not answer.
fn watermarks(client: &BaseConsumer, topics: &[String]) -> Option<Vec<(SourcePartition, i64, i64)>> {
    let mut found = Vec::new();
    for topic in topics {
        let partitions = match client.fetch_metadata(Some(topic), Duration::from_secs(2)) {
            Ok(metadata) => metadata
                .topics()
                .iter()
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect::<Vec<_>>(),
            Err(e) => {
                debug!(topic = %topic, error = %e, "lag: no metadata");
                return None;
            }
        };
        for partition in partitions {
            match client.fetch_watermarks(topic, partition, Duration::from_secs(2)) {
                Ok((low, high)) => {
                    let source = SourcePartition {
                        topic: topic.as_str().into(),
                        partition,
                    };
                    found.push((source, low, high));
                }
                Err(e) => {
                    debug!(topic = %topic, partition, error = %e, "lag: no watermarks");
                    return None;
                }
            }
        }
    }
    *BROKERS_ANSWERED.lock().expect("answered lock") = Some(Instant::now());
    Some(found)
}

fn refresh_replay(client: &BaseConsumer, store: &Store, replay: &Replay, switch_lag_events: i64) {
    let Ok(stored) = store.offsets(&replay.fold.generation) else {
        return;
    };
    let positions: BTreeMap<SourcePartition, (i64, i64, i64)> = watermarks(client, &replay.fold.topics)
        .unwrap_or_default()
        .into_iter()
        .map(|(source, low, high)| {
            let next = stored.get(&source).copied().unwrap_or(low);
            (source, (next, low, high))
        })
        .collect();
    if positions.is_empty() {
        return;
    }
    replay.record_progress(&positions, switch_lag_events);
}

fn refresh(client: &BaseConsumer, store: &Store, projection: &ProjectionRuntime, memory: &mut Memory) {
    let live = projection.live();
    let Ok(stored) = store.offsets(&live.generation) else {
        return;
    };
    let mut total = (0, 0.0_f64);
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let Some(watermarks) = watermarks(client, &live.topics) else {
        // Nothing can be measured while the brokers are silent; what was lag
        // keeps ageing, so a stalled cluster shows as growing lag.
        let silent = BROKERS_ANSWERED
            .lock()
            .expect("answered lock")
            .map(|at| at.elapsed().as_secs_f64())
            .unwrap_or(0.0);
        for ((name, source), seconds) in &memory.published {
            if *name == projection.name {
                let partition_label = source.partition.to_string();
                metrics::CONSUMER_LAG_SECONDS
                    .with_label_values(&[name.as_str(), &source.topic, partition_label.as_str()])
                    .set(seconds + silent);
                total.1 = total.1.max(seconds + silent);
            }
        }
        SUMMARY
            .lock()
            .expect("summary lock")
            .insert(projection.name.clone(), total);
        return;
    };
    for (source, low, high) in watermarks {
        let next = stored.get(&source).copied().unwrap_or(low);
        let lag_events = (high - next).max(0);
        let since_key = (projection.name.clone(), source.clone());
        let lag_seconds = if lag_events == 0 {
            memory.lagging_since.remove(&since_key);
            0.0
        } else {
            let since = *memory
                .lagging_since
                .entry(since_key.clone())
                .or_insert_with(Instant::now);
            match live.oldest_unapplied(&source) {
                Some(timestamp_ms) => ((now_ms - timestamp_ms).max(0) as f64) / 1000.0,
                None => since.elapsed().as_secs_f64(),
            }
        };
        let partition_label = source.partition.to_string();
        let labels = [projection.name.as_str(), &source.topic, partition_label.as_str()];
        metrics::CONSUMER_LAG_EVENTS
            .with_label_values(&labels)
            .set(lag_events);
        metrics::CONSUMER_LAG_SECONDS
            .with_label_values(&labels)
            .set(lag_seconds);
        memory
            .published
            .insert((projection.name.clone(), source.clone()), lag_seconds);
        total = (total.0 + lag_events, total.1.max(lag_seconds));
    }
    SUMMARY
        .lock()
        .expect("summary lock")
        .insert(projection.name.clone(), total);
}
