//! The cluster topic: created when missing, written by this worker's publisher
//! thread and read back by its view thread.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Message, Offset, TopicPartitionList};
use tracing::{info, warn};

use super::replays::{self, Step};
use super::{
    ClaimState, Cluster, PartitionClaim, ProjectionClaims, ReplayClaims, ReplayRecord, ReplayState,
    WorkerRecord, REPLAY_KEY_PREFIX,
};
use crate::config::KafkaConfig;
use crate::fold_state::{Fold, Restore};
use crate::kafka_client::{self, Role};
use crate::store::{SourcePartition, Store};
use crate::supervisor::Supervisor;

/// How long a metadata or watermark query may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// Creates the cluster topic (compacted, one partition, the brokers' default
/// replication) unless it exists.
pub async fn ensure(kafka: &KafkaConfig, topic: &str) -> Result<(), String> {
    let admin: AdminClient<DefaultClientContext> = kafka_client::config(kafka, Role::Metadata)
        .create()
        .map_err(|e| format!("cluster topic `{topic}`: {e}"))?;
    let new = NewTopic::new(topic, 1, TopicReplication::Fixed(-1)).set("cleanup.policy", "compact");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics([&new], &options)
        .await
        .map_err(|e| format!("creating the cluster topic `{topic}`: {e}"))?;
    for result in results {
        match result {
            Ok(_) => info!(topic, "created the cluster topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(format!("creating the cluster topic `{topic}`: {code}")),
        }
    }
    Ok(())
}

/// Starts the thread that publishes this worker's record every
/// `publish_interval` (moving gained partitions through restoring on the way)
/// and tombstones it once `shutdown` is set (the other workers then stop asking
/// this one while its fold loops commit and leave their groups). On the way it
/// follows each projection's replay record, and moves it on when this worker
/// is the coordinator ([`replays`]).
pub fn spawn_publisher(
    cluster: Arc<Cluster>,
    kafka: &KafkaConfig,
    store: Arc<Store>,
    projections: Vec<Arc<Supervisor>>,
    switch_lag_events: i64,
    shutdown: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, String> {
    let producer: BaseProducer = kafka_client::config(kafka, Role::Producer)
        .create()
        .map_err(|e| format!("the cluster topic's producer: {e}"))?;
    let metadata: BaseConsumer = kafka_client::config(kafka, Role::Metadata)
        .create()
        .map_err(|e| format!("the cluster topic's metadata client: {e}"))?;
    let thread = std::thread::Builder::new()
        .name("cluster-publisher".into())
        .spawn(move || {
            let mut written = HashMap::new();
            while !shutdown.load(Ordering::Relaxed) {
                let published = crate::panics::contained(|| {
                    count_partitions(&cluster, &metadata, &projections);
                    for projection in &projections {
                        let Some(record) = cluster.replay_of(&projection.name) else {
                            continue;
                        };
                        replays::follow(projection, &record, &store);
                        coordinate(
                            &cluster,
                            &metadata,
                            projection,
                            record,
                            switch_lag_events,
                            &mut written,
                        );
                    }
                    let record = own_record(&cluster, &metadata, &store, &projections);
                    publish(&cluster, &producer, Some(&record));
                });
                if let Err(panic) = published {
                    warn!(error = %panic, "publishing to the cluster topic failed");
                }
                let deadline = Instant::now() + cluster.publish_interval;
                while Instant::now() < deadline && !shutdown.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            // Gone on purpose: the others stop routing here at once.
            publish(&cluster, &producer, None);
            if let Err(e) = producer.flush(Duration::from_secs(5)) {
                warn!(error = %e, "the cluster topic's tombstone was not acknowledged");
            }
        })
        .map_err(|e| format!("spawning the cluster publisher: {e}"))?;
    Ok(thread)
}

fn publish(cluster: &Cluster, producer: &BaseProducer, record: Option<&WorkerRecord>) {
    let payload = record.map(|r| serde_json::to_vec(r).expect("a worker record serializes"));
    let mut message = BaseRecord::<str, Vec<u8>>::to(&cluster.topic).key(&cluster.worker_id);
    if let Some(payload) = &payload {
        message = message.payload(payload);
    }
    if let Err((e, _)) = producer.send(message) {
        warn!(error = %e, topic = %cluster.topic, "publishing this worker's record");
    }
    producer.poll(Duration::ZERO);
}

/// Moves `record` on when this worker is the coordinator and the workers'
/// records say so; `written` remembers what it wrote when, so a step the view
/// does not show yet is written again only after a while.
fn coordinate(
    cluster: &Cluster,
    metadata: &BaseConsumer,
    projection: &Supervisor,
    record: ReplayRecord,
    switch_lag_events: i64,
    written: &mut HashMap<(String, u64, ReplayState), Instant>,
) {
    if !record.state.running() || cluster.coordinator().as_deref() != Some(cluster.worker_id.as_str()) {
        return;
    }
    let topics = crate::config::definition_topics(&projection.configured_definition);
    let partitions = partition_names(cluster, &topics);
    let workers: Vec<WorkerRecord> = cluster.workers().into_iter().map(|(r, _)| r).collect();
    let mut next = record.clone();
    match replays::advance(&record, &workers, &partitions, switch_lag_events) {
        Step::Wait => return,
        Step::Write(state) => next.state = state,
        Step::MeasureTargets => {
            let mut targets = BTreeMap::new();
            for topic in &topics {
                for partition in 0..cluster.partition_count(topic).unwrap_or(0) {
                    match metadata.fetch_watermarks(topic, partition, QUERY_TIMEOUT) {
                        Ok((_, high)) => targets.insert(format!("{topic}/{partition}"), high),
                        Err(e) => {
                            warn!(error = %e, topic, partition, "measuring a replay's switch targets");
                            return;
                        }
                    };
                }
            }
            next.state = ReplayState::Switching;
            next.targets = targets;
        }
    }
    let step = (record.projection.clone(), record.generation, next.state);
    if written
        .get(&step)
        .is_some_and(|at| at.elapsed() < Duration::from_secs(5))
    {
        return;
    }
    info!(projection = %record.projection, generation = record.generation, step = next.state.as_str(),
        "coordinating the replay across workers");
    next.updated_at_ms = now_ms();
    cluster.send_replay(&next);
    written.insert(step, Instant::now());
}

/// Every partition of `topics` as `topic/partition`, once the brokers said how
/// many there are (empty until then).
pub(crate) fn partition_names(cluster: &Cluster, topics: &[String]) -> Vec<String> {
    let mut names = Vec::new();
    for topic in topics {
        let Some(count) = cluster.partition_count(topic) else {
            return Vec::new();
        };
        names.extend((0..count).map(|p| format!("{topic}/{p}")));
    }
    names
}

/// Milliseconds since the epoch.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Learns the partition count of every source topic.
fn count_partitions(cluster: &Cluster, metadata: &BaseConsumer, projections: &[Arc<Supervisor>]) {
    let mut topics: Vec<String> = projections.iter().flat_map(|p| p.live().topics.clone()).collect();
    topics.sort();
    topics.dedup();
    for topic in topics {
        if let Ok(found) = metadata.fetch_metadata(Some(&topic), QUERY_TIMEOUT) {
            if let Some(described) = found.topics().iter().find(|t| t.name() == topic) {
                let count = described.partitions().len();
                if described.error().is_none() && count > 0 {
                    cluster.set_partition_count(&topic, i32::try_from(count).unwrap_or(i32::MAX));
                }
            }
        }
    }
}

/// This worker's record: per projection, the partitions its live generation
/// has assigned, each restoring or live.
fn own_record(
    cluster: &Cluster,
    metadata: &BaseConsumer,
    store: &Store,
    projections: &[Arc<Supervisor>],
) -> WorkerRecord {
    let mut claims = BTreeMap::new();
    // High watermarks asked once per publication, for every projection on a topic.
    let mut highs = HashMap::new();
    for projection in projections {
        let live = projection.live();
        let partitions = advance_restores(&live, metadata, store, &mut highs);
        let restoring = partitions.iter().filter(|p| p.state == ClaimState::Restoring);
        let remaining = restoring
            .clone()
            .map(|p| {
                p.restore_until
                    .map_or(0, |until| until.saturating_sub(p.next_offset).max(0))
            })
            .fold(0i64, i64::saturating_add);
        crate::metrics::RESTORING_PARTITIONS
            .with_label_values(&[&projection.name])
            .set(i64::try_from(restoring.count()).unwrap_or(i64::MAX));
        crate::metrics::RESTORE_REMAINING_EVENTS
            .with_label_values(&[&projection.name])
            .set(remaining);
        let replay = projection.replay().map(|replay| {
            let seen = cluster
                .replay_of(&projection.name)
                .filter(|r| r.generation == replay.fold.generation.number)
                .map_or(ReplayState::Running, |r| r.state);
            ReplayClaims {
                generation: replay.fold.generation.number,
                seen,
                live_stopped: !live.loop_running(),
                events_per_second: replay.progress().events_per_second,
                status: status_of(&replay.fold),
                partitions: advance_restores(&replay.fold, metadata, store, &mut highs),
            }
        });
        claims.insert(
            projection.name.clone(),
            ProjectionClaims {
                generation: live.generation.number,
                status: status_of(&live),
                partitions,
                replay,
            },
        );
    }
    WorkerRecord {
        worker_id: cluster.worker_id.clone(),
        url: cluster.url.clone(),
        published_at_ms: now_ms(),
        projections: claims,
    }
}

/// A fold loop's state by name (`running`, `poisoned`, ...).
fn status_of(fold: &Fold) -> String {
    serde_json::to_value(fold.state())
        .ok()
        .and_then(|v| v["state"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Moves each gained partition of `fold` on: learns the high watermark it must
/// reach, and marks it restored once its stored offset reaches it. A fold that
/// does not serve (poisoned, failed, stopped) claims nothing.
fn advance_restores(
    fold: &Fold,
    metadata: &BaseConsumer,
    store: &Store,
    highs: &mut HashMap<SourcePartition, Option<(i64, i64)>>,
) -> Vec<PartitionClaim> {
    if !fold.serves() {
        return Vec::new();
    }
    let Ok(offsets) = store.offsets(&fold.generation) else {
        return Vec::new();
    };
    let mut claims = Vec::new();
    let fetch = |partition: &SourcePartition| {
        metadata
            .fetch_watermarks(&partition.topic, partition.partition, QUERY_TIMEOUT)
            .ok()
    };
    for (partition, (gain, mut restore)) in fold.serving() {
        // A restore's target is asked after the gain, never taken from the cache.
        let watermarks = if restore == Restore::Unknown {
            let fresh = fetch(&partition);
            highs.insert(partition.clone(), fresh);
            fresh
        } else {
            *highs
                .entry(partition.clone())
                .or_insert_with(|| fetch(&partition))
        };
        // Never folded by this generation: it starts at the log's beginning.
        let next = offsets
            .get(&partition)
            .copied()
            .or(watermarks.map(|(low, _)| low))
            .unwrap_or(0);
        let generation = fold.generation.number;
        restore = next_restore(restore, next, watermarks.map(|(_, high)| high), |target| {
            crate::lag::nothing_left(fold.name(), generation, &partition, next, target)
        });
        fold.set_restore(&partition, gain, restore);
        let high = watermarks.map(|(_, high)| high);
        let (state, restore_until) = match restore {
            Restore::Done => (ClaimState::Live, None),
            Restore::Until(target) => (ClaimState::Restoring, Some(target)),
            Restore::Unknown => (ClaimState::Restoring, None),
        };
        claims.push(PartitionClaim {
            topic: partition.topic.to_string(),
            partition: partition.partition,
            state,
            next_offset: next,
            restore_until,
            lag_events: high.map(|high| high.saturating_sub(next).max(0)),
        });
    }
    claims
}

/// Where a gained partition stands after this publication: its target is the
/// high watermark asked now (after the gain), and it is restored once its
/// stored next offset reaches it, or once nothing but transaction markers and
/// aborted records lie between them (`nothing_left` of the target).
fn next_restore(
    restore: Restore,
    next: i64,
    high: Option<i64>,
    nothing_left: impl FnOnce(i64) -> bool,
) -> Restore {
    let restore = match (restore, high) {
        (Restore::Unknown, Some(high)) => Restore::Until(high),
        (other, _) => other,
    };
    match restore {
        Restore::Until(target) if next >= target || nothing_left(target) => Restore::Done,
        other => other,
    }
}

/// Starts the thread that reads the cluster topic from its beginning into
/// `cluster`'s view, until `shutdown` is set.
pub fn spawn_view(
    cluster: Arc<Cluster>,
    kafka: &KafkaConfig,
    shutdown: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, String> {
    let consumer: BaseConsumer = kafka_client::config(
        kafka,
        Role::Probe {
            group_id: &format!("{}.cluster-view", kafka.group_prefix),
            partition_eof: false,
        },
    )
    // A broker answers a fetch at the end of the log only when this wait is
    // over (Tansu does): librdkafka's 500 ms left one worker's view a second
    // behind another's, so a replay requested on one was not yet seen there.
    .set("fetch.wait.max.ms", "50")
    .create()
    .map_err(|e| format!("the cluster topic's reader: {e}"))?;
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(&cluster.topic, 0, Offset::Beginning)
        .map_err(|e| format!("the cluster topic's reader: {e}"))?;
    consumer
        .assign(&assignment)
        .map_err(|e| format!("reading the cluster topic `{}`: {e}", cluster.topic))?;
    let thread = std::thread::Builder::new()
        .name("cluster-view".into())
        .spawn(move || {
            while !shutdown.load(Ordering::Relaxed) {
                let Some(polled) = consumer.poll(Duration::from_millis(100)) else {
                    // Nothing came: at the end, unless the first fetch has not
                    // answered yet, so the end is asked of the brokers.
                    if !cluster.view_current() {
                        let end = consumer.fetch_watermarks(&cluster.topic, 0, QUERY_TIMEOUT);
                        if end.is_ok_and(|(_, high)| cluster.view_position() >= high) {
                            cluster.set_view_current();
                        }
                    }
                    continue;
                };
                let message = match polled {
                    Ok(message) => message,
                    Err(e) => {
                        warn!(error = %e, topic = %cluster.topic, "reading the cluster topic");
                        std::thread::sleep(Duration::from_millis(200));
                        continue;
                    }
                };
                cluster.set_view_position(message.offset().saturating_add(1));
                let Some(worker_id) = message.key().map(|k| String::from_utf8_lossy(k).into_owned()) else {
                    continue;
                };
                if worker_id.starts_with(REPLAY_KEY_PREFIX) {
                    match message.payload().map(serde_json::from_slice::<ReplayRecord>) {
                        Some(Ok(record)) => cluster.remember_replay(record),
                        Some(Err(e)) => warn!(error = %e, topic = %cluster.topic, offset = message.offset(),
                            key = %worker_id, "a replay record that does not parse: ignored"),
                        None => {}
                    }
                    continue;
                }
                let record = match message.payload() {
                    None => None,
                    Some(bytes) => match serde_json::from_slice::<WorkerRecord>(bytes) {
                        Ok(record) => Some(record),
                        Err(e) => {
                            warn!(error = %e, topic = %cluster.topic, partition = message.partition(),
                                offset = message.offset(), worker = %worker_id,
                                "a cluster topic record that is not a worker record: ignored");
                            continue;
                        }
                    },
                };
                // Published this long ago (the publisher's clock): a record read
                // back at start from a worker killed long ago is stale at once.
                let age = message
                    .timestamp()
                    .to_millis()
                    .map(|at| now_ms().saturating_sub(at).max(0))
                    .and_then(|ms| u64::try_from(ms).ok())
                    .map_or(Duration::ZERO, Duration::from_millis);
                cluster.remember(&worker_id, record, age);
            }
        })
        .map_err(|e| format!("spawning the cluster view: {e}"))?;
    Ok(thread)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gained_partition_is_restored_once_it_reaches_the_high_watermark_seen_after_the_gain() {
        let never = |_| false;
        // The brokers did not say: still unknown.
        assert_eq!(next_restore(Restore::Unknown, 5, None, never), Restore::Unknown);
        // Behind the watermark asked now: restoring up to it.
        assert_eq!(
            next_restore(Restore::Unknown, 5, Some(9), never),
            Restore::Until(9)
        );
        // A later, higher watermark does not move the target.
        assert_eq!(
            next_restore(Restore::Until(9), 8, Some(20), never),
            Restore::Until(9)
        );
        assert_eq!(next_restore(Restore::Until(9), 9, Some(20), never), Restore::Done);
        // Already there at the gain (an empty log, or caught up).
        assert_eq!(next_restore(Restore::Unknown, 9, Some(9), never), Restore::Done);
        // Only markers left between the stored offset and the target.
        assert_eq!(
            next_restore(Restore::Until(9), 7, Some(9), |target| target == 9),
            Restore::Done
        );
        // Done stays done.
        assert_eq!(next_restore(Restore::Done, 0, Some(100), never), Restore::Done);
    }
}
