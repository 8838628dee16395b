//! Multi-worker mode (`[cluster]`): Kafka's consumer groups decide which worker
//! folds which partitions; each worker publishes itself and what it owns to a
//! compacted single-partition topic ([`topic`]) and reads every worker's record
//! back into memory, so any worker can route a read to the owners of the
//! partitions it needs (`serve::cluster`).
//!
//! The topic is a hint: a worker that receives a forwarded read checks it against
//! its own assignment and answers "unavailable" for what it does not serve. A
//! partition a worker gained is served only once it has folded up to the high
//! watermark seen after the gain ([`crate::fold_state::Restore`]), so a reader
//! never sees a value older than the previous owner served.

mod partitioner;
mod record;
pub mod replays;
pub mod topic;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, FutureRecord};

pub use record::{
    replay_key, ClaimState, PartitionClaim, ProjectionClaims, ReplayClaims, ReplayRecord, ReplayState,
    WorkerRecord, REPLAY_KEY_PREFIX,
};

use crate::config::{ClusterConfig, KafkaConfig, Partitioner};
use crate::store::SourcePartition;

/// The header that carries the cluster secret on requests between workers.
pub const SECRET_HEADER: &str = "x-projector-cluster-secret";

/// This worker's place in the cluster and its view of the others.
pub struct Cluster {
    /// This worker's id.
    pub worker_id: String,
    /// This worker's advertised URL.
    pub url: String,
    /// The cluster topic.
    pub topic: String,
    /// How producers partition keys.
    pub partitioner: Partitioner,
    /// How long a forwarded read may take.
    pub forward_timeout: Duration,
    /// Between two publications of this worker's record.
    pub publish_interval: Duration,
    secret: String,
    /// Every worker's last record and when it arrived.
    members: RwLock<BTreeMap<String, (WorkerRecord, Instant)>>,
    /// Partitions per source topic, from the brokers' metadata.
    partition_counts: RwLock<BTreeMap<String, i32>>,
    /// Each projection's last replay across workers.
    replays: RwLock<BTreeMap<String, ReplayRecord>>,
    /// The next offset of the cluster topic the view will read.
    view_next_offset: AtomicI64,
    /// The view has read the cluster topic to its end once since the start.
    view_current: AtomicBool,
    /// The client of forwarded reads.
    pub http: reqwest::Client,
    /// Writes replay records (and asks the cluster topic's watermarks).
    producer: FutureProducer,
}

/// A worker that owns a partition, as the cluster topic says.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Owner {
    /// Its id.
    pub worker_id: String,
    /// Its HTTP API.
    pub url: String,
}

impl Cluster {
    /// This worker's cluster membership, before it has read the topic.
    pub fn new(config: &ClusterConfig, kafka: &KafkaConfig, listen_port: u16) -> Result<Cluster, String> {
        let forward_timeout = Duration::from_millis(config.forward_timeout_ms);
        let http = reqwest::Client::builder()
            .timeout(forward_timeout)
            .connect_timeout(forward_timeout.min(Duration::from_secs(2)))
            .build()
            .map_err(|e| format!("the client of forwarded reads: {e}"))?;
        let producer = crate::kafka_client::config(kafka, crate::kafka_client::Role::Producer)
            .create()
            .map_err(|e| format!("the cluster topic's producer: {e}"))?;
        Ok(Cluster {
            producer,
            worker_id: config.worker_id(listen_port),
            url: config.advertised_url.trim_end_matches('/').to_owned(),
            topic: config.topic(&kafka.group_prefix),
            partitioner: kafka.partitioner,
            forward_timeout,
            publish_interval: Duration::from_millis(config.publish_interval_ms),
            secret: config.secret.clone(),
            members: RwLock::default(),
            partition_counts: RwLock::default(),
            replays: RwLock::default(),
            view_next_offset: AtomicI64::new(0),
            view_current: AtomicBool::new(false),
            http,
        })
    }

    /// The secret that requests between workers carry.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// A record older than this is from a worker gone without a tombstone
    /// (killed): its claims are ignored.
    fn stale_after(&self) -> Duration {
        self.publish_interval * 3 + Duration::from_secs(3)
    }

    /// Remembers a worker's record, published `age` ago, or forgets the worker
    /// (a tombstone).
    pub(crate) fn remember(&self, worker_id: &str, record: Option<WorkerRecord>, age: Duration) {
        let mut members = self.members.write().expect("members lock");
        match record {
            Some(record) => {
                // Clocks differ between machines: a record is never younger than
                // its arrival, and never older than the staleness limit says.
                let age = age.min(self.stale_after());
                let published = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
                members.insert(worker_id.to_owned(), (record, published));
            }
            None => {
                members.remove(worker_id);
            }
        }
    }

    /// Every worker heard from recently, with how long ago.
    pub fn workers(&self) -> Vec<(WorkerRecord, Duration)> {
        let stale_after = self.stale_after();
        self.members
            .read()
            .expect("members lock")
            .values()
            .filter(|(_, at)| at.elapsed() < stale_after)
            .map(|(record, at)| (record.clone(), at.elapsed()))
            .collect()
    }

    /// The other worker that serves `partition` of `projection`'s live
    /// generation, as the cluster topic says; the one furthest ahead when two
    /// claim it (a move not yet published by both).
    pub fn owner_of(&self, projection: &str, partition: &SourcePartition) -> Option<Owner> {
        self.workers()
            .into_iter()
            .filter(|(record, _)| record.worker_id != self.worker_id)
            .filter_map(|(record, _)| {
                let claims = record.projections.get(projection)?;
                let claim = claims.partitions.iter().find(|c| {
                    c.state == ClaimState::Live
                        && c.partition == partition.partition
                        && *c.topic == *partition.topic
                })?;
                Some((
                    claim.next_offset,
                    Owner {
                        worker_id: record.worker_id.clone(),
                        url: record.url.clone(),
                    },
                ))
            })
            .max()
            .map(|(_, owner)| owner)
    }

    /// Partitions of `topic`, once the brokers said.
    pub fn partition_count(&self, topic: &str) -> Option<i32> {
        self.partition_counts
            .read()
            .expect("counts lock")
            .get(topic)
            .copied()
    }

    /// The last replay of `projection` across workers, as the cluster topic says.
    pub fn replay_of(&self, projection: &str) -> Option<ReplayRecord> {
        self.replays
            .read()
            .expect("replays lock")
            .get(projection)
            .cloned()
    }

    /// Remembers a replay record read from the cluster topic.
    pub(crate) fn remember_replay(&self, record: ReplayRecord) {
        self.replays
            .write()
            .expect("replays lock")
            .insert(record.projection.clone(), record);
    }

    /// Writes a replay record to the cluster topic; its offset once the brokers
    /// have it.
    pub async fn write_replay(&self, record: &ReplayRecord) -> Result<i64, String> {
        let payload = serde_json::to_vec(record).map_err(|e| e.to_string())?;
        let key = replay_key(&record.projection);
        let message = FutureRecord::to(&self.topic).key(&key).payload(&payload);
        match self.producer.send(message, self.forward_timeout).await {
            Ok(delivered) => Ok(delivered.offset),
            Err((e, _)) => Err(format!(
                "writing `{key}` to the cluster topic `{}`: {e}",
                self.topic
            )),
        }
    }

    /// Writes a replay record without waiting for the brokers (the coordinator
    /// writes again while the view does not show it).
    pub(crate) fn send_replay(&self, record: &ReplayRecord) {
        let Ok(payload) = serde_json::to_vec(record) else {
            return;
        };
        let key = replay_key(&record.projection);
        let message = FutureRecord::to(&self.topic).key(&key).payload(&payload);
        if let Err((e, _)) = self.producer.send_result(message) {
            tracing::warn!(error = %e, topic = %self.topic, "writing a replay record");
        }
    }

    /// Waits (blocking, up to `wait`) until the view has read every record the
    /// cluster topic had when asked: what any worker wrote before is in the
    /// view then. False when it could not.
    pub fn catch_up_view(&self, wait: Duration) -> bool {
        use rdkafka::producer::Producer as _;
        let deadline = Instant::now() + wait;
        let high = match self.producer.client().fetch_watermarks(&self.topic, 0, wait) {
            Ok((_, high)) => high,
            Err(e) => {
                tracing::warn!(error = %e, topic = %self.topic, "asking the cluster topic's high watermark");
                return false;
            }
        };
        while self.view_position() < high {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// Waits (blocking, up to `wait`) until the view has read the record at
    /// `offset`.
    pub fn wait_for_view(&self, offset: i64, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        while self.view_position() <= offset {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// The view has read the cluster topic up to (not including) `next`.
    pub(crate) fn set_view_position(&self, next: i64) {
        self.view_next_offset.fetch_max(next, Ordering::SeqCst);
    }

    /// The view found nothing more to read: it has read the topic to its end.
    pub(crate) fn set_view_current(&self) {
        self.view_current.store(true, Ordering::SeqCst);
    }

    /// True once the view has read the cluster topic to its end since this
    /// worker started: before, it does not know how far a replay across
    /// workers has come, so it serves nothing.
    pub fn view_current(&self) -> bool {
        self.view_current.load(Ordering::SeqCst)
    }

    /// The next offset of the cluster topic the view will read.
    pub fn view_position(&self) -> i64 {
        self.view_next_offset.load(Ordering::SeqCst)
    }

    /// The live worker with the lowest id, which moves replays on.
    pub fn coordinator(&self) -> Option<String> {
        self.workers().into_iter().map(|(r, _)| r.worker_id).min()
    }

    pub(crate) fn set_partition_count(&self, topic: &str, count: i32) {
        self.partition_counts
            .write()
            .expect("counts lock")
            .insert(topic.to_owned(), count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> Cluster {
        let config: ClusterConfig = serde_json::from_value(serde_json::json!({
            "worker_id": "w1",
            "advertised_url": "http://127.0.0.1:1/",
            "secret": "0123456789abcdef",
        }))
        .unwrap();
        let kafka: KafkaConfig = serde_json::from_value(serde_json::json!({"brokers": "b:9092"})).unwrap();
        Cluster::new(&config, &kafka, 1).unwrap()
    }

    fn record(worker: &str, offset: i64, state: ClaimState) -> WorkerRecord {
        WorkerRecord {
            worker_id: worker.into(),
            url: format!("http://{worker}"),
            published_at_ms: 0,
            projections: BTreeMap::from([(
                "p".to_owned(),
                ProjectionClaims {
                    generation: 1,
                    status: "running".into(),
                    partitions: vec![PartitionClaim {
                        topic: "orders".into(),
                        partition: 3,
                        state,
                        next_offset: offset,
                        restore_until: None,
                        lag_events: None,
                    }],
                    replay: None,
                },
            )]),
        }
    }

    #[test]
    fn the_owner_is_a_live_claim_of_another_worker_furthest_ahead() {
        let cluster = cluster();
        let p3 = SourcePartition {
            topic: "orders".into(),
            partition: 3,
        };
        assert_eq!(cluster.owner_of("p", &p3), None);
        cluster.remember("w1", Some(record("w1", 90, ClaimState::Live)), Duration::ZERO);
        assert_eq!(cluster.owner_of("p", &p3), None, "not itself");
        cluster.remember(
            "w2",
            Some(record("w2", 10, ClaimState::Restoring)),
            Duration::ZERO,
        );
        assert_eq!(cluster.owner_of("p", &p3), None, "restoring is not served");
        cluster.remember("w3", Some(record("w3", 50, ClaimState::Live)), Duration::ZERO);
        cluster.remember("w4", Some(record("w4", 70, ClaimState::Live)), Duration::ZERO);
        cluster.remember(
            "w5",
            Some(record("w5", 99, ClaimState::Live)),
            Duration::from_secs(3600),
        );
        assert_eq!(
            cluster.owner_of("p", &p3).unwrap().worker_id,
            "w4",
            "w5's record was published an hour ago"
        );
        cluster.remember("w4", None, Duration::ZERO);
        assert_eq!(cluster.owner_of("p", &p3).unwrap().worker_id, "w3");
        assert_eq!(cluster.owner_of("other", &p3), None);
        assert_eq!(cluster.workers().len(), 3);
    }
}
