//! Consumer lag, in events and in seconds, refreshed on a timer so a stalled
//! projection shows growing lag even when nothing arrives.
//!
//! Lag is measured against the offsets stored with state (the truth), not the
//! group's committed offsets: events = high watermark − next offset to apply;
//! seconds = age of the oldest event not yet applied: its record timestamp, from
//! the fold loop when it has polled that event, else fetched from the broker
//! (once per stored offset). A partition whose records past the stored offset are
//! only transaction markers or aborted records (a transactional producer's topic)
//! is caught up: 0 in events and seconds. Each worker reports only the partitions
//! its fold loops own, and drops a partition's series when it loses it.
//!
//! The same refresh measures each running replay's progress against the high
//! watermarks and tells the projection's supervisor when it has caught up (see
//! [`crate::supervisor`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};
use tracing::{debug, error, warn};

mod log_end;

use crate::config::KafkaConfig;

use crate::kafka_client::{self, Role};
use crate::metrics;
use crate::replay::Replay;
use crate::store::{SourcePartition, Store};
use crate::supervisor::Supervisor;

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

/// Per projection generation and partition: the stored next offset at which
/// the last refresh found nothing left to fold up to the high watermark (only
/// transaction markers or aborted records past it), with that high watermark.
static NOTHING_LEFT: LazyLock<Mutex<HashMap<LeftKey, (i64, i64)>>> = LazyLock::new(Default::default);

/// (generation, projection, partition)
type LeftKey = (u64, String, SourcePartition);

/// Whether the lag monitor last found `partition` of generation `generation` of
/// `projection` caught up at stored next offset `next` with nothing but markers
/// up to a high watermark of at least `high`.
pub fn nothing_left(
    projection: &str,
    generation: u64,
    partition: &SourcePartition,
    next: i64,
    high: i64,
) -> bool {
    NOTHING_LEFT
        .lock()
        .expect("nothing-left lock")
        .get(&(generation, projection.to_owned(), partition.clone()))
        .is_some_and(|&(at, up_to)| at == next && up_to >= high)
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
    /// (stored next offset, high watermark) of partitions whose stored offset is
    /// above the high watermark but whose log was found to reach it.
    log_reaches: HashMap<(String, SourcePartition), (i64, i64)>,
    /// Consecutive probes that found a partition's log shorter than its offset.
    log_short: HashMap<(String, SourcePartition), u32>,
    /// What the broker said is at a stored next offset: (next offset, high
    /// watermark, what is there).
    oldest: HashMap<(String, SourcePartition), (i64, i64, Oldest)>,
}

/// The oldest record at or after a partition's next offset to apply.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Oldest {
    /// A record with this timestamp (ms).
    At(i64),
    /// No data record up to the high watermark: only transaction markers or
    /// aborted records are left, so the partition is caught up.
    NoneLeft,
    /// The broker did not say in time.
    Unknown,
}

/// How long a lag probe waits for the record at a stored offset.
const LAG_PROBE_WAIT: Duration = Duration::from_secs(1);

/// Starts the lag monitor on its own thread; it stops when `shutdown` is set.
pub fn spawn(
    kafka: &KafkaConfig,
    switch_lag_events: i64,
    store: Arc<Store>,
    projections: Vec<Arc<Supervisor>>,
    shutdown: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, rdkafka::error::KafkaError> {
    // Only metadata and watermark queries: no group, no subscription.
    let client: BaseConsumer = kafka_client::config(kafka, Role::Metadata).create()?;
    // Reads single records by assignment to check that a log reaches an offset.
    let probe: BaseConsumer = kafka_client::config(
        kafka,
        Role::Probe {
            group_id: &format!("{}.log-probe", kafka.group_prefix),
            partition_eof: false,
        },
    )
    .create()?;
    // Reads the record at a stored offset for its timestamp; says when nothing but
    // transaction markers is left (the end of the partition before any record).
    let lag_probe: BaseConsumer = kafka_client::config(
        kafka,
        Role::Probe {
            group_id: &format!("{}.lag-probe", kafka.group_prefix),
            partition_eof: true,
        },
    )
    .create()?;
    Ok(std::thread::Builder::new()
        .name("lag-monitor".into())
        .spawn(move || {
            let mut memory = Memory::default();
            while !shutdown.load(Ordering::Relaxed) {
                for projection in &projections {
                    let probes = Probes {
                        log: &probe,
                        lag: &lag_probe,
                    };
                    // A bug here must not stop lag reporting for good: it would
                    // leave every projection looking as it last did.
                    let refreshed = crate::panics::contained(|| {
                        refresh(&client, &probes, &store, projection, &mut memory);
                        if let Some(replay) = projection.replay() {
                            refresh_replay(&client, &store, projection, &replay, switch_lag_events);
                        }
                    });
                    if let Err(panic) = refreshed {
                        error!(projection = %projection.name, error = %panic, "refreshing lag {panic}");
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

/// Measures a replay's progress; within `switch_lag_events` of the high
/// watermarks, tells the supervisor it caught up (the handover starts).
fn refresh_replay(
    client: &BaseConsumer,
    store: &Store,
    projection: &Supervisor,
    replay: &Arc<Replay>,
    switch_lag_events: i64,
) {
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
    let progress = replay.record_progress(&positions);
    // In multi-worker mode the cluster's coordinator decides, over every
    // worker's partitions (`cluster::replays`).
    if progress.lag_events <= switch_lag_events && !projection.is_clustered() {
        if let Err(e) = projection.replay_caught_up(replay, store) {
            warn!(error = %e, "starting the handover");
        }
    }
}

/// The consumers the monitor reads single records with.
struct Probes<'a> {
    /// Checks that a log reaches a stored offset.
    log: &'a BaseConsumer,
    /// Reads the oldest unapplied record's timestamp.
    lag: &'a BaseConsumer,
}

fn refresh(
    client: &BaseConsumer,
    probes: &Probes<'_>,
    store: &Store,
    projection: &Supervisor,
    memory: &mut Memory,
) {
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
        // Owned partitions never measured yet (assigned just before the brokers
        // went silent) age from 0.
        for source in live.owned_partitions() {
            memory
                .published
                .entry((projection.name.clone(), source))
                .or_insert(0.0);
        }
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
    log_end::check_logs_reach_offsets(probes.log, &projection.name, &live, &watermarks, &stored, memory);
    let owned = live.owned_partitions();
    forget_unowned(&projection.name, &owned, memory);
    for (source, low, high) in watermarks {
        if !owned.contains(&source) {
            continue;
        }
        let next = stored.get(&source).copied().unwrap_or(low);
        let mut lag_events = (high - next).max(0);
        let since_key = (projection.name.clone(), source.clone());
        let oldest = if lag_events == 0 {
            Oldest::NoneLeft
        } else if let Some(timestamp_ms) = live.oldest_unapplied(&source) {
            Oldest::At(timestamp_ms)
        } else {
            oldest_unapplied(probes.lag, memory, &since_key, next, high)
        };
        let left_key = (live.generation.number, projection.name.clone(), source.clone());
        if oldest == Oldest::NoneLeft {
            NOTHING_LEFT
                .lock()
                .expect("nothing-left lock")
                .insert(left_key, (next, high));
        } else {
            NOTHING_LEFT.lock().expect("nothing-left lock").remove(&left_key);
        }
        let lag_seconds = match oldest {
            Oldest::NoneLeft => {
                lag_events = 0;
                memory.lagging_since.remove(&since_key);
                0.0
            }
            Oldest::At(timestamp_ms) => {
                let age = Duration::from_millis((now_ms - timestamp_ms).max(0) as u64);
                // Should the broker not answer next time, the lag ages from here.
                memory.lagging_since.insert(
                    since_key.clone(),
                    Instant::now().checked_sub(age).unwrap_or_else(Instant::now),
                );
                age.as_secs_f64()
            }
            Oldest::Unknown => memory
                .lagging_since
                .entry(since_key.clone())
                .or_insert_with(Instant::now)
                .elapsed()
                .as_secs_f64(),
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

/// Drops the series and memory of partitions this worker no longer owns (another
/// worker of the group folds them and reports their lag).
fn forget_unowned(name: &str, owned: &std::collections::BTreeSet<SourcePartition>, memory: &mut Memory) {
    let lost: Vec<SourcePartition> = memory
        .published
        .keys()
        .filter(|(projection, source)| projection == name && !owned.contains(source))
        .map(|(_, source)| source.clone())
        .collect();
    for source in lost {
        let key = (name.to_owned(), source.clone());
        memory.published.remove(&key);
        memory.lagging_since.remove(&key);
        memory.oldest.remove(&key);
        let partition_label = source.partition.to_string();
        let labels = [name, &*source.topic, partition_label.as_str()];
        let _ = metrics::CONSUMER_LAG_EVENTS.remove_label_values(&labels);
        let _ = metrics::CONSUMER_LAG_SECONDS.remove_label_values(&labels);
        debug!(projection = name, partition = %source, "partition no longer owned: its lag series dropped");
    }
}

/// The oldest record at or after `next` that the fold loop has not polled: asked
/// of the broker once per stored offset (the record there does not change), and
/// again for "none left" when the high watermark moves.
fn oldest_unapplied(
    probe: &BaseConsumer,
    memory: &mut Memory,
    key: &(String, SourcePartition),
    next: i64,
    high: i64,
) -> Oldest {
    match memory.oldest.get(key) {
        Some(&(at, _, found @ Oldest::At(_))) if at == next => return found,
        Some(&(at, seen_high, Oldest::NoneLeft)) if at == next && seen_high == high => {
            return Oldest::NoneLeft
        }
        _ => {}
    }
    let found = probe_oldest(probe, &key.1, next);
    memory.oldest.insert(key.clone(), (next, high, found));
    found
}

/// Fetches from `next` (read-committed, like the fold's consumer): the first
/// record's timestamp, or [`Oldest::NoneLeft`] when the end of the partition comes
/// first.
fn probe_oldest(probe: &BaseConsumer, partition: &SourcePartition, next: i64) -> Oldest {
    let mut assignment = TopicPartitionList::new();
    if assignment
        .add_partition_offset(&partition.topic, partition.partition, Offset::Offset(next))
        .is_err()
        || probe.assign(&assignment).is_err()
    {
        return Oldest::Unknown;
    }
    let deadline = Instant::now() + LAG_PROBE_WAIT;
    let mut found = Oldest::Unknown;
    while Instant::now() < deadline {
        match probe.poll(Duration::from_millis(50)) {
            Some(Ok(message)) if message.offset() >= next => {
                found = message
                    .timestamp()
                    .to_millis()
                    .map_or(Oldest::Unknown, Oldest::At);
                break;
            }
            Some(Err(KafkaError::PartitionEOF(p))) if p == partition.partition => {
                found = Oldest::NoneLeft;
                break;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => debug!(error = %e, "lag probe"),
            None => {}
        }
    }
    let _ = probe.unassign();
    found
}
