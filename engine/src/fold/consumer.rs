//! The fold loop's Kafka consumer: its configuration, its rebalance callbacks
//! (start assigned partitions at the stored offsets; note revocations for the
//! loop), and polling in chunks.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::ClientContext;
use tracing::{info, warn};

use crate::config::KafkaConfig;
use crate::fold_state::Fold;
use crate::kafka_client::Role;
use crate::store::{Generation, SourcePartition, Store, StoreError};

/// Kafka callbacks of one fold loop's consumer: positions on assignment,
/// revocations left for the loop to handle in message order.
pub(super) struct SourceContext {
    pub(super) store: Arc<Store>,
    /// The folds the loop folds (several in a shared source).
    pub(super) folds: Mutex<Vec<Arc<Fold>>>,
    /// Where each assigned partition started (the lowest stored offset of the
    /// folds), until the loop has consumed from it.
    pub(super) started_at: Mutex<HashMap<SourcePartition, i64>>,
    /// The partitions assigned now.
    pub(super) assignment: Mutex<BTreeSet<SourcePartition>>,
    pub(super) revoked: Mutex<Vec<SourcePartition>>,
    pub(super) assignment_error: Mutex<Option<String>>,
    /// Set as the loop ends: the revocation of closing the consumer is no loss of
    /// ownership (a projection stopped on a poison event keeps reporting its lag).
    pub(super) closing: AtomicBool,
}

/// The fold loop's consumer.
pub(super) type SourceConsumer = BaseConsumer<SourceContext>;

impl ClientContext for SourceContext {}

impl ConsumerContext for SourceContext {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                if let Err(e) = self.start_from_stored_offsets(tpl) {
                    // Without the stored offsets the partitions cannot be read safely:
                    // leave them unassigned and stop the loop.
                    *self.assignment_error.lock().expect("lock") = Some(e.to_string());
                    return;
                }
                let assigned = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                match assigned {
                    Ok(()) => {
                        let partitions = partitions_of(tpl);
                        for fold in self.folds.lock().expect("lock").iter() {
                            fold.own(partitions.iter().cloned());
                            fold.start_serving(partitions.iter().cloned());
                            fold.set_assigned();
                        }
                        self.assignment.lock().expect("lock").extend(partitions);
                    }
                    Err(e) => *self.assignment_error.lock().expect("lock") = Some(e.to_string()),
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let partitions = partitions_of(tpl);
                // A closing loop's fold is served as the next loop says (a source
                // that adopts it may have done so already); see `Fold::serving`.
                if !self.closing.load(Ordering::Relaxed) {
                    for fold in self.folds.lock().expect("lock").iter() {
                        fold.stop_serving(&partitions);
                    }
                }
                info!(partitions = ?partitions.iter().map(|p| p.to_string()).collect::<Vec<_>>(), "partitions revoked");
                // In callback order, so a revocation and the assignment after it
                // leave the partition owned. Partitions lost with the session
                // (brokers silent) stay ours to report: their lag keeps ageing.
                if !self.closing.load(Ordering::Relaxed) && !consumer.assignment_lost() {
                    for fold in self.folds.lock().expect("lock").iter() {
                        fold.disown(&partitions);
                    }
                }
                {
                    let mut assignment = self.assignment.lock().expect("lock");
                    let mut started_at = self.started_at.lock().expect("lock");
                    for partition in &partitions {
                        assignment.remove(partition);
                        started_at.remove(partition);
                    }
                }
                self.revoked.lock().expect("lock").extend(partitions);
                let unassigned = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = unassigned {
                    warn!(error = %e, "unassigning revoked partitions");
                }
            }
            other => {
                warn!(error = ?other, "rebalance error; dropping the assignment");
                for fold in self.folds.lock().expect("lock").iter() {
                    fold.stop_serving_all();
                }
                let _ = consumer.unassign();
            }
        }
    }
}

impl SourceContext {
    /// Starts each assigned partition at the lowest stored next offset of the
    /// folds (from its beginning when one has none): each fold drops what it
    /// applied already.
    fn start_from_stored_offsets(&self, tpl: &mut TopicPartitionList) -> Result<(), StoreError> {
        let folds = self.folds.lock().expect("lock").clone();
        for partition in partitions_of(tpl) {
            let mut lowest = Some(i64::MAX);
            for fold in &folds {
                lowest = match (lowest, self.store.next_offset(&fold.generation, &partition)?) {
                    (Some(low), Some(next)) => Some(low.min(next)),
                    _ => None,
                };
            }
            let offset = match lowest.filter(|low| *low != i64::MAX) {
                Some(next) => Offset::Offset(next),
                None => Offset::Beginning,
            };
            self.started_at.lock().expect("lock").insert(
                partition.clone(),
                lowest.filter(|low| *low != i64::MAX).unwrap_or(0),
            );
            info!(topic = %partition.topic, partition = partition.partition, start = ?offset, "partition assigned");
            // The partition is in the list we were given, so this cannot fail.
            let _ = tpl.set_partition_offset(&partition.topic, partition.partition, offset);
        }
        Ok(())
    }
}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<SourcePartition> {
    tpl.elements()
        .iter()
        .map(|e| SourcePartition {
            topic: e.topic().into(),
            partition: e.partition(),
        })
        .collect()
}

/// Creates the consumer of a loop folding `folds` (one, or the members of a
/// shared source, which all read `topics`), subscribed to their topics.
pub(super) fn subscribe(
    kafka: &KafkaConfig,
    store: Arc<Store>,
    folds: Vec<Arc<Fold>>,
    shared: bool,
) -> Result<SourceConsumer, KafkaError> {
    let topics = folds.first().map(|f| f.topics.clone()).unwrap_or_default();
    let group_id = match (&folds[..], shared) {
        ([fold], false) => group_id(kafka, &fold.generation),
        _ => shared_group_id(kafka, &topics),
    };
    let context = SourceContext {
        store,
        folds: Mutex::new(folds),
        started_at: Mutex::new(HashMap::new()),
        assignment: Mutex::new(BTreeSet::new()),
        revoked: Mutex::new(Vec::new()),
        assignment_error: Mutex::new(None),
        closing: AtomicBool::new(false),
    };
    let consumer: SourceConsumer =
        crate::kafka_client::config(kafka, Role::FoldConsumer { group_id: &group_id })
            .create_with_context(context)?;
    let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    Ok(consumer)
}

/// The consumer group of a generation folding on its own: `<prefix>.<projection>`
/// for the first, `<prefix>.<projection>.g<n>` for later ones, so a replay's
/// consumer never shares partitions with the live one.
fn group_id(kafka: &KafkaConfig, generation: &Generation) -> String {
    match generation.number {
        1 => format!("{}.{}", kafka.group_prefix, generation.projection),
        n => format!("{}.{}.g{n}", kafka.group_prefix, generation.projection),
    }
}

/// The consumer group of the shared source of `topics`:
/// `<prefix>.source.<topic>+<topic>...` (sorted).
fn shared_group_id(kafka: &KafkaConfig, topics: &[String]) -> String {
    let mut sorted = topics.to_vec();
    sorted.sort();
    format!("{}.source.{}", kafka.group_prefix, sorted.join("+"))
}

/// Messages taken from the consumer in one go.
pub(super) struct Polled<'c> {
    pub(super) messages: Vec<BorrowedMessage<'c>>,
    /// The consumer reported a partition's position outside its log.
    pub(super) offsets_outside_log: bool,
}

/// Messages polled at most per chunk: enough to keep the decoding thread busy,
/// few enough that a quiet topic's events are folded at once.
const CHUNK_MESSAGES: usize = 500;

/// Polls what the consumer has ready, waiting up to `wait` for the first message;
/// stops early at a rebalance or a consumer error.
pub(super) fn poll_chunk(consumer: &SourceConsumer, wait: Duration) -> Polled<'_> {
    let mut polled = Polled {
        messages: Vec::new(),
        offsets_outside_log: false,
    };
    let mut timeout = wait;
    while polled.messages.len() < CHUNK_MESSAGES {
        match consumer.poll(timeout) {
            None => break,
            Some(Ok(message)) => polled.messages.push(message),
            Some(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset))) => {
                polled.offsets_outside_log = true;
                break;
            }
            Some(Err(e)) => {
                warn!(error = %e, "consumer error");
                break;
            }
        }
        if rebalance_pending(consumer) {
            break;
        }
        timeout = Duration::ZERO;
    }
    polled
}

/// The consumer's rebalance callback left something for the loop to handle.
pub(super) fn rebalance_pending(consumer: &SourceConsumer) -> bool {
    let context = consumer.context();
    !context.revoked.lock().expect("lock").is_empty()
        || context.assignment_error.lock().expect("lock").is_some()
}
