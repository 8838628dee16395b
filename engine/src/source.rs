//! The fold loop of one projection: consume, decode, fold, commit.
//!
//! Each projection has its own consumer group and its own thread. The loop keeps a
//! write-back cache of the keys a batch touched and commits the batch as one RocksDB
//! write with the next offset of every partition it read. Offsets in RocksDB are the
//! truth: on assignment the consumer starts from them, and a message below the next
//! offset of its partition (a redelivery) is dropped, so nothing is applied twice.
//!
//! Messages are polled in chunks; while one chunk is folded, the next is decoded on
//! a second thread ([`crate::decode_ahead`]). A rebalance or a consumer error is
//! handled only after every message polled before it has been folded.
//!
//! A loop folds one generation ([`Fold`]); a replay's loop also drives the replay's
//! handover (see [`crate::replay`]) and then goes on as the live loop.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::ClientContext;
use serde_json::Value as Json;
use tracing::{debug, error, info, info_span, warn};

use crate::config::{KafkaConfig, PoisonPolicy, ReplayConfig, StoreConfig};
use crate::dead_letter::DeadLetters;
use crate::decode::{DecodeError, Decoder};
use crate::decode_ahead::{DecodeAhead, Decoded, DecoderGone};
use crate::metrics;
use crate::poison::PoisonReason;
use crate::projection::{Event, EventMeta, FoldError, PartitionState};
use crate::replay::{self, Replay};
use crate::runtime::{Fold, LogBehind, ProjectionRuntime, RunState};
use crate::schemas::CurrentEvent;
use crate::store::{BatchWrite, SourcePartition, Store, StoreError};

/// What the fold loop needs besides its projection.
#[derive(Clone)]
pub struct SourceDeps {
    /// Kafka settings.
    pub kafka: KafkaConfig,
    /// Batch settings.
    pub store_config: StoreConfig,
    /// Replay settings.
    pub replay_config: ReplayConfig,
    /// The worker's database.
    pub store: Arc<Store>,
    /// Set to stop: the loop commits its batch and leaves the group.
    pub shutdown: Arc<AtomicBool>,
    /// For the blocking calls of async clients (registry, dead-letter producer).
    pub async_runtime: tokio::runtime::Handle,
}

/// Starts the fold loop of one generation of `projection` on its own thread (the
/// caller has marked the fold's loop as running).
pub fn spawn(
    projection: Arc<ProjectionRuntime>,
    fold: Arc<Fold>,
    decoder: Decoder,
    deps: SourceDeps,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name(format!("fold-{}", fold.generation.column_family()))
        .spawn(move || {
            let span =
                info_span!("projection", projection = %projection.name, generation = fold.generation.number);
            let _entered = span.enter();
            let replay = projection.replay().filter(|r| Arc::ptr_eq(&r.fold, &fold));
            let (store, shutdown) = (deps.store.clone(), deps.shutdown.clone());
            let outcome = FoldLoop::new(projection.clone(), fold.clone(), replay.clone(), decoder, deps)
                .and_then(|mut l| l.run());
            if let Err(failure) = outcome {
                error!(error = %failure, "fold loop stopped");
                fold.set_state(RunState::Failed {
                    error: failure.to_string(),
                });
            }
            // A replay loop that switched is the live loop now; one that did not
            // hands the projection back to its live generation.
            if let Some(replay) = replay.filter(|_| !fold.is_live()) {
                replay::after_loop(&projection, &store, &replay, shutdown.load(Ordering::Relaxed));
            }
            fold.set_loop_running(false);
        })
        .expect("spawning a thread")
}

/// Why the loop ended abnormally.
#[derive(Debug, thiserror::Error)]
enum LoopError {
    #[error(transparent)]
    DeadLetter(#[from] crate::dead_letter::DeadLetterError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("partition assignment failed: {0}")]
    Assignment(String),
    #[error(
        "shut down while the store refused writes: the open batch of {events} events was not \
             written and will be folded again from the stored offsets ({error})"
    )]
    UnwrittenAtShutdown { events: u64, error: StoreError },
    #[error("starting the decoding thread: {0}")]
    DecoderThread(std::io::Error),
    #[error(transparent)]
    DecoderGone(#[from] DecoderGone),
}

/// Kafka callbacks of one projection's consumer: positions on assignment, revocations.
struct SourceContext {
    store: Arc<Store>,
    fold: Arc<Fold>,
    revoked: Mutex<Vec<SourcePartition>>,
    assignment_error: Mutex<Option<String>>,
}

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
                    Ok(()) => self.fold.set_assigned(),
                    Err(e) => *self.assignment_error.lock().expect("lock") = Some(e.to_string()),
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let partitions = partitions_of(tpl);
                info!(partitions = ?partitions.iter().map(|p| p.to_string()).collect::<Vec<_>>(), "partitions revoked");
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
                let _ = consumer.unassign();
            }
        }
    }
}

impl SourceContext {
    fn start_from_stored_offsets(&self, tpl: &mut TopicPartitionList) -> Result<(), StoreError> {
        for partition in partitions_of(tpl) {
            let offset = match self.store.next_offset(&self.fold.generation, &partition)? {
                Some(next) => Offset::Offset(next),
                None => Offset::Beginning,
            };
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

/// One key's partial state in the current batch.
type CacheKey = (String, SourcePartition);

/// Cache entries as they were before a message changed them (`None`: not cached),
/// to restore when a later event of the same message fails.
type UndoLog = Vec<(CacheKey, Option<Option<Json>>)>;

struct FoldLoop {
    consumer: BaseConsumer<SourceContext>,
    dead_letters: Option<DeadLetters>,
    batch: OpenBatch,
}

/// Everything of the loop but the consumer, so a message borrowed from the consumer
/// can be folded into it.
struct OpenBatch {
    runtime: Arc<ProjectionRuntime>,
    fold: Arc<Fold>,
    /// Set while this loop builds a replay's generation.
    replay: Option<Arc<Replay>>,
    /// When a throttled replay started counting, and the events since.
    throttle: Option<(Instant, u64, u32)>,
    decode_ahead: DecodeAhead,
    deps: SourceDeps,
    /// Next offset to apply per partition, as far as this loop knows (committed or in
    /// the open batch).
    positions: HashMap<SourcePartition, i64>,
    topics: HashMap<String, Arc<str>>,
    cache: HashMap<CacheKey, Option<Json>>,
    offsets: BTreeMap<SourcePartition, i64>,
    events: u64,
    /// Record timestamps (ms) of the batch's events, for the freshness histogram.
    timestamps: Vec<i64>,
    started: Option<Instant>,
    /// Partitions whose first unapplied event of this batch was noted for lag.
    unapplied_noted: std::collections::HashSet<SourcePartition>,
}

/// How processing one message ended, when it did not end in a fold.
enum Stop {
    Poison { reason: PoisonReason, error: String },
    Interrupted,
}

/// What the loop does with a message after trying it.
enum Outcome {
    /// Folded (or skipped by policy): the offset moves past it.
    Applied,
    /// Stop here (policy `stop`); nothing at or after it is committed.
    Halt,
    /// Shutting down mid-message (waiting for the registry or a dead-letter
    /// acknowledgement); the message is left for the next run.
    Retry,
}

impl FoldLoop {
    fn new(
        runtime: Arc<ProjectionRuntime>,
        fold: Arc<Fold>,
        replay: Option<Arc<Replay>>,
        decoder: Decoder,
        deps: SourceDeps,
    ) -> Result<Self, LoopError> {
        let context = SourceContext {
            store: deps.store.clone(),
            fold: fold.clone(),
            revoked: Mutex::new(Vec::new()),
            assignment_error: Mutex::new(None),
        };
        let consumer: BaseConsumer<SourceContext> =
            consumer_config(&deps.kafka, &fold.generation).create_with_context(context)?;
        let dead_letters = match (&runtime.on_poison, &runtime.dead_letter_topic) {
            (PoisonPolicy::DeadLetter, Some(topic)) => {
                Some(DeadLetters::new(&deps.kafka, topic, deps.async_runtime.clone())?)
            }
            _ => None,
        };
        let topics: Vec<&str> = fold.topics.iter().map(String::as_str).collect();
        let throttle = replay
            .as_ref()
            .and(deps.replay_config.max_events_per_second)
            .map(|rate| (Instant::now(), 0, rate.max(1)));
        let decode_ahead = DecodeAhead::start(
            decoder,
            format!("decode-{}", fold.generation.column_family()),
            deps.shutdown.clone(),
        )
        .map_err(LoopError::DecoderThread)?;
        consumer.subscribe(&topics)?;
        Ok(FoldLoop {
            consumer,
            dead_letters,
            batch: OpenBatch {
                runtime,
                fold,
                replay,
                throttle,
                decode_ahead,
                deps,
                positions: HashMap::new(),
                topics: HashMap::new(),
                cache: HashMap::new(),
                offsets: BTreeMap::new(),
                events: 0,
                started: None,
                unapplied_noted: Default::default(),
                timestamps: Vec::new(),
            },
        })
    }

    fn run(&mut self) -> Result<(), LoopError> {
        let fold = self.batch.fold.clone();
        fold.set_state(RunState::Running);
        let consumer = &self.consumer;
        let batch = &mut self.batch;
        let folder = ChunkFolder {
            runtime: batch.runtime.clone(),
            fold: fold.clone(),
            dead_letters: self.dead_letters.as_ref(),
            max_wait: Duration::from_millis(batch.deps.store_config.batch_max_wait_ms),
            max_events: batch.deps.store_config.batch_max_events as u64,
        };
        // Messages polled and being decoded while the chunk before them is folded.
        let mut ahead: Option<Vec<BorrowedMessage<'_>>> = None;
        loop {
            if batch.deps.shutdown.load(Ordering::Relaxed) || fold.stop_requested() {
                // A chunk still ahead was not applied: it is read again next time.
                commit(consumer, batch)?;
                info!("stopping: batch committed");
                fold.set_state(RunState::Stopped);
                return Ok(());
            }
            drive_replay(consumer, batch)?;
            if let Some(found) = fold.take_log_behind() {
                // Only for a partition this loop still folds, still at that offset
                // (the report may be older than a rebalance or a resume).
                let owned = consumer.assignment().is_ok_and(|assigned| {
                    assigned
                        .find_partition(&found.partition.topic, found.partition.partition)
                        .is_some()
                });
                // A chunk polled ahead may hold the very offset the probe missed.
                let polled_ahead = ahead.iter().flatten().any(|m| {
                    m.partition() == found.partition.partition && m.topic() == &*found.partition.topic
                });
                if owned && !polled_ahead && batch.position(&found.partition)? == found.next {
                    stop_on_log_behind(consumer, batch, found)?;
                    return Ok(());
                }
            }
            let wait = if ahead.is_some() {
                Duration::ZERO
            } else {
                Duration::from_millis(50)
            };
            let polled = poll_chunk(consumer, wait);
            if !polled.messages.is_empty() {
                let max_bytes = batch.runtime.max_event_bytes;
                // Values over the limit are poison without being decoded.
                batch.decode_ahead.submit(
                    polled
                        .messages
                        .iter()
                        .map(|m| m.payload().filter(|v| v.len() <= max_bytes)),
                )?;
            }
            if let Some(previous) = ahead.take() {
                if folder.fold_chunk(consumer, batch, previous)? == ChunkEnd::LoopEnded {
                    return Ok(());
                }
            }
            // A rebalance or an offset error is handled with every message polled
            // before it folded, as when messages were taken one at a time.
            let rebalanced = rebalance_pending(consumer);
            if rebalanced || polled.offsets_outside_log || polled.messages.is_empty() {
                if !polled.messages.is_empty()
                    && folder.fold_chunk(consumer, batch, polled.messages)? == ChunkEnd::LoopEnded
                {
                    return Ok(());
                }
                if rebalanced {
                    handle_rebalance(consumer, batch)?;
                }
                if polled.offsets_outside_log && stop_on_offsets_outside_the_log(consumer, batch)? {
                    return Ok(());
                }
                if !rebalanced && !polled.offsets_outside_log {
                    // Nothing more to read right now: write what was folded.
                    commit(consumer, batch)?;
                }
            } else {
                ahead = Some(polled.messages);
            }
        }
    }
}

/// Messages taken from the consumer in one go.
struct Polled<'c> {
    messages: Vec<BorrowedMessage<'c>>,
    /// The consumer reported a partition's position outside its log.
    offsets_outside_log: bool,
}

/// Messages polled at most per chunk: enough to keep the decoding thread busy,
/// few enough that a quiet topic's events are folded at once.
const CHUNK_MESSAGES: usize = 500;

/// Polls what the consumer has ready, waiting up to `wait` for the first message;
/// stops early at a rebalance or a consumer error.
fn poll_chunk(consumer: &BaseConsumer<SourceContext>, wait: Duration) -> Polled<'_> {
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
fn rebalance_pending(consumer: &BaseConsumer<SourceContext>) -> bool {
    let context = consumer.context();
    !context.revoked.lock().expect("lock").is_empty()
        || context.assignment_error.lock().expect("lock").is_some()
}

/// Whether the loop goes on after a chunk.
#[derive(Debug, PartialEq, Eq)]
enum ChunkEnd {
    Folded,
    /// Stopped at a message (poison under `stop`, or shutdown mid-message).
    LoopEnded,
}

/// The per-message decisions of the loop, for the messages of one chunk.
struct ChunkFolder<'d> {
    runtime: Arc<ProjectionRuntime>,
    fold: Arc<Fold>,
    dead_letters: Option<&'d DeadLetters>,
    max_wait: Duration,
    max_events: u64,
}

impl ChunkFolder<'_> {
    /// Folds `messages`, the oldest chunk submitted for decoding, in order.
    fn fold_chunk(
        &self,
        consumer: &BaseConsumer<SourceContext>,
        batch: &mut OpenBatch,
        messages: Vec<BorrowedMessage<'_>>,
    ) -> Result<ChunkEnd, LoopError> {
        let decoded = batch.decode_ahead.next()?;
        for (message, decoded) in messages.into_iter().zip(decoded) {
            if self.fold_message(consumer, batch, message, decoded)? == ChunkEnd::LoopEnded {
                return Ok(ChunkEnd::LoopEnded);
            }
        }
        Ok(ChunkEnd::Folded)
    }

    fn fold_message(
        &self,
        consumer: &BaseConsumer<SourceContext>,
        batch: &mut OpenBatch,
        message: BorrowedMessage<'_>,
        decoded: Decoded,
    ) -> Result<ChunkEnd, LoopError> {
        let (runtime, fold) = (&self.runtime, &self.fold);
        let partition = SourcePartition {
            topic: batch.intern(message.topic()),
            partition: message.partition(),
        };
        let offset = message.offset();
        let next = batch.position(&partition)?;
        if offset >= next && batch.unapplied_noted.insert(partition.clone()) {
            fold.note_unapplied(&partition, message.timestamp().to_millis().unwrap_or(0));
        }
        if offset < next {
            debug!(topic = %partition.topic, partition = partition.partition, offset, next, "already applied; dropped");
            return Ok(ChunkEnd::Folded);
        }
        let outcome = if fold.take_skip(&partition.topic, partition.partition, offset) {
            metrics::OPERATOR_SKIPS.with_label_values(&[&runtime.name]).inc();
            warn!(topic = %partition.topic, partition = partition.partition, offset,
                "operator skip: event at {partition} offset {offset} skipped without folding");
            Outcome::Applied
        } else {
            match batch.apply(&message, &partition, decoded) {
                Ok(()) => Outcome::Applied,
                Err(Stop::Interrupted) => Outcome::Retry,
                Err(Stop::Poison { reason, error }) => {
                    let shutdown = batch.deps.shutdown.clone();
                    let keep_waiting = move || !shutdown.load(Ordering::Relaxed);
                    handle_poison(
                        runtime,
                        fold,
                        self.dead_letters,
                        &message,
                        &partition,
                        reason,
                        error,
                        &keep_waiting,
                    )?
                }
            }
        };
        match outcome {
            Outcome::Applied => {}
            Outcome::Retry => {
                // Never go on to later messages past one left unapplied: stop
                // here, committed up to it, and let the next run start from it.
                drop(message);
                commit(consumer, batch)?;
                info!("stopping mid-message: batch committed");
                fold.set_state(RunState::Stopped);
                return Ok(ChunkEnd::LoopEnded);
            }
            Outcome::Halt => {
                let timestamp = message.timestamp().to_millis().unwrap_or(0);
                drop(message);
                commit(consumer, batch)?;
                // The event it stopped at stays unapplied: its age is the lag.
                fold.note_unapplied(&partition, timestamp);
                return Ok(ChunkEnd::LoopEnded);
            }
        }
        batch.positions.insert(partition.clone(), offset + 1);
        batch.offsets.insert(partition, offset + 1);
        batch.events += 1;
        if let Some(timestamp) = message.timestamp().to_millis() {
            batch.timestamps.push(timestamp);
        }
        let started = *batch.started.get_or_insert_with(Instant::now);
        if batch.events >= self.max_events || started.elapsed() >= self.max_wait {
            commit(consumer, batch)?;
        }
        batch.throttle();
        Ok(ChunkEnd::Folded)
    }
}

/// Applies the projection's poison policy to one event; counts and logs it.
#[allow(clippy::too_many_arguments)]
fn handle_poison(
    runtime: &ProjectionRuntime,
    fold: &Fold,
    dead_letters: Option<&DeadLetters>,
    message: &BorrowedMessage<'_>,
    partition: &SourcePartition,
    reason: PoisonReason,
    error: String,
    keep_waiting: &dyn Fn() -> bool,
) -> Result<Outcome, LoopError> {
    let offset = message.offset();
    metrics::POISON_EVENTS
        .with_label_values(&[&runtime.name, reason.as_str()])
        .inc();
    match (runtime.on_poison, dead_letters) {
        (PoisonPolicy::Skip, _) => {
            warn!(topic = %partition.topic, partition = partition.partition, offset, reason = %reason, error = %error,
                "poison event skipped (on_poison = skip): {partition} offset {offset} ({reason}): {error}");
            Ok(Outcome::Applied)
        }
        (PoisonPolicy::DeadLetter, Some(dead_letters)) => {
            match dead_letters.send(message, &runtime.name, reason, &error, keep_waiting) {
                Ok(()) => {}
                // Nowhere to put it: the event stops the projection, as under `stop`.
                Err(refused) if refused.refused => {
                    let error = format!("{error}; and its dead letter was refused: {refused}");
                    return Ok(stop_at(fold, partition, offset, reason, error));
                }
                Err(failure) => return Err(failure.into()),
            }
            metrics::DEAD_LETTERS.with_label_values(&[&runtime.name]).inc();
            warn!(topic = %partition.topic, partition = partition.partition, offset, reason = %reason, error = %error,
                "poison event dead-lettered: {partition} offset {offset} ({reason}): {error}");
            Ok(Outcome::Applied)
        }
        _ => Ok(stop_at(fold, partition, offset, reason, error)),
    }
}

/// Stops the projection at a poison event (policy `stop`, or a dead letter with
/// nowhere to go).
fn stop_at(
    fold: &Fold,
    partition: &SourcePartition,
    offset: i64,
    reason: PoisonReason,
    error: String,
) -> Outcome {
    error!(
        topic = %partition.topic,
        partition = partition.partition,
        offset,
        reason = %reason,
        error = %error,
        "poison event: projection stopped at {partition} offset {offset} ({reason}): {error}"
    );
    fold.set_state(RunState::Poisoned {
        topic: partition.topic.to_string(),
        partition: partition.partition,
        offset,
        reason,
        error,
    });
    Outcome::Halt
}

fn handle_rebalance(consumer: &BaseConsumer<SourceContext>, batch: &mut OpenBatch) -> Result<(), LoopError> {
    if let Some(error) = consumer.context().assignment_error.lock().expect("lock").take() {
        commit(consumer, batch)?;
        return Err(LoopError::Assignment(error));
    }
    let revoked: Vec<SourcePartition> =
        std::mem::take(&mut *consumer.context().revoked.lock().expect("lock"));
    if !revoked.is_empty() {
        // The open batch is consistent (state and offsets of the events already
        // folded), so it is committed as it is; the partitions' positions are
        // forgotten and read from the store again if they come back.
        commit(consumer, batch)?;
        for partition in revoked {
            batch.positions.remove(&partition);
        }
    }
    Ok(())
}

/// After the consumer reported a fetch position outside a partition's log: finds
/// the partition whose stored offset lies outside `[low, high]` and stops the
/// projection there with reason `offsets_reset` (true), rather than let the
/// consumer jump to another position and fold new data onto old state.
fn stop_on_offsets_outside_the_log(
    consumer: &BaseConsumer<SourceContext>,
    batch: &mut OpenBatch,
) -> Result<bool, LoopError> {
    let assignment = consumer.assignment()?;
    for element in assignment.elements() {
        let partition = SourcePartition {
            topic: batch.intern(element.topic()),
            partition: element.partition(),
        };
        let next = batch.position(&partition)?;
        let Ok((low, high)) =
            consumer.fetch_watermarks(element.topic(), element.partition(), Duration::from_secs(5))
        else {
            continue;
        };
        if next < low || next > high {
            stop_on_log_behind(
                consumer,
                batch,
                LogBehind {
                    partition,
                    next,
                    low,
                    high,
                },
            )?;
            return Ok(true);
        }
    }
    warn!("the consumer reported an offset out of range, but every stored offset is inside its log");
    Ok(false)
}

/// Stops the projection with reason `offsets_reset` at a partition whose log no
/// longer holds its stored offset, rather than fold new data onto old state.
fn stop_on_log_behind(
    consumer: &BaseConsumer<SourceContext>,
    batch: &mut OpenBatch,
    found: LogBehind,
) -> Result<(), LoopError> {
    commit(consumer, batch)?;
    let LogBehind {
        partition,
        next,
        low,
        high,
    } = found;
    let error = format!(
        "the stored next offset {next} of {partition} is outside its log [{low}, {high}]: the topic \
         was recreated or truncated, or events expired before they were applied; \
         `projector reset` or a replay rebuilds the projection from the log as it is now"
    );
    error!(topic = %partition.topic, partition = partition.partition, offset = next,
        reason = "offsets_reset", "projection stopped: {error}");
    batch.fold.set_state(RunState::Poisoned {
        topic: partition.topic.to_string(),
        partition: partition.partition,
        offset: next,
        reason: PoisonReason::OffsetsReset,
        error,
    });
    Ok(())
}

/// Drives a replay's handover (see [`crate::replay`]) from its own loop: once
/// caught up, stop the live loop; once the live loop's offsets are final and this
/// loop has folded up to them, commit and switch.
fn drive_replay(consumer: &BaseConsumer<SourceContext>, batch: &mut OpenBatch) -> Result<(), LoopError> {
    let Some(replay) = batch.replay.clone() else {
        return Ok(());
    };
    if !replay::begin_handover(&batch.runtime, &replay) {
        return Ok(());
    }
    let Some(target) = replay::live_final_offsets(&batch.runtime, &batch.deps.store)? else {
        return Ok(());
    };
    for (partition, next) in &target {
        if batch.position(partition)? < *next {
            return Ok(());
        }
    }
    commit(consumer, batch)?;
    replay::switch(&batch.runtime, &batch.deps.store, &replay)?;
    batch.replay = None;
    batch.throttle = None;
    Ok(())
}

/// Writes the open batch, then tells the group (asynchronously) where we are.
fn commit(consumer: &BaseConsumer<SourceContext>, batch: &mut OpenBatch) -> Result<(), LoopError> {
    let Some(offsets) = batch.write()? else {
        return Ok(());
    };
    let mut tpl = TopicPartitionList::new();
    for (partition, next) in &offsets {
        let _ = tpl.add_partition_offset(&partition.topic, partition.partition, Offset::Offset(*next));
    }
    if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
        // Group offsets are informational (external lag tools); ours are in RocksDB.
        debug!(error = %e, "async group commit failed");
    }
    Ok(())
}

impl OpenBatch {
    fn intern(&mut self, topic: &str) -> Arc<str> {
        if let Some(interned) = self.topics.get(topic) {
            return interned.clone();
        }
        let interned: Arc<str> = topic.into();
        self.topics.insert(topic.to_owned(), interned.clone());
        interned
    }

    /// Holds a throttled replay to its configured rate.
    fn throttle(&mut self) {
        let Some((since, events, rate)) = &mut self.throttle else {
            return;
        };
        *events += 1;
        let due = Duration::from_secs_f64(*events as f64 / f64::from(*rate));
        let elapsed = since.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
        if *events >= u64::from(*rate) {
            // Restart the count every second or so, so a pause is not made up for
            // with a burst.
            *since = Instant::now();
            *events = 0;
        }
    }

    /// Next offset to apply in `partition`.
    fn position(&mut self, partition: &SourcePartition) -> Result<i64, StoreError> {
        if let Some(next) = self.positions.get(partition) {
            return Ok(*next);
        }
        let next = self
            .deps
            .store
            .next_offset(&self.fold.generation, partition)?
            .unwrap_or(0);
        self.positions.insert(partition.clone(), next);
        Ok(next)
    }

    /// Decodes, upcasts and folds one message. When it fails, the batch is as it
    /// was before the message, even if an upcaster split it and some of its events
    /// were already folded.
    fn apply(
        &mut self,
        message: &BorrowedMessage<'_>,
        partition: &SourcePartition,
        decoded: Decoded,
    ) -> Result<(), Stop> {
        let size = message.payload_len();
        if size > self.runtime.max_event_bytes {
            return Err(Stop::Poison {
                reason: PoisonReason::BadFrame,
                error: format!(
                    "value of {size} bytes exceeds max_event_bytes = {}",
                    self.runtime.max_event_bytes
                ),
            });
        }
        let events = decoded.map_err(|e| match e {
            DecodeError::Poison { reason, message } => Stop::Poison {
                reason,
                error: message,
            },
            DecodeError::Interrupted(_) => Stop::Interrupted,
        })?;
        let meta = EventMeta {
            topic: partition.topic.clone(),
            partition: partition.partition,
            offset: message.offset(),
            timestamp_ms: message.timestamp().to_millis(),
            key: message.key().map(|k| String::from_utf8_lossy(k).into()),
        };
        if events.len() == 1 {
            return self.fold(&events[0], &meta, partition, None);
        }
        let mut undo = Vec::new();
        for event in &events {
            if let Err(stop) = self.fold(event, &meta, partition, Some(&mut undo)) {
                for (key, before) in undo.into_iter().rev() {
                    match before {
                        Some(state) => self.cache.insert(key, state),
                        None => self.cache.remove(&key),
                    };
                }
                return Err(stop);
            }
        }
        Ok(())
    }

    /// Folds one event into the cache. With `undo`, records each cache entry's
    /// value before its first change (`None`: the entry was not cached).
    fn fold(
        &mut self,
        current: &CurrentEvent,
        meta: &EventMeta,
        partition: &SourcePartition,
        undo: Option<&mut UndoLog>,
    ) -> Result<(), Stop> {
        let event = Event {
            name: &current.name,
            payload: &current.payload,
            meta,
        };
        let mut state = BatchState {
            cache: &mut self.cache,
            store: &self.deps.store,
            generation: &self.fold.generation,
            partition,
            undo,
        };
        self.fold
            .projection
            .apply(&event, &mut state)
            .map_err(|e| Stop::Poison {
                reason: PoisonReason::FoldFailed,
                error: e.0,
            })
    }

    /// Writes `batch`, waiting out a store that refuses writes (a full disk: RocksDB
    /// resumes by itself once space returns). Nothing else is folded meanwhile and
    /// the batch's offsets move only with its state; reads keep being served. On
    /// shutdown during the wait the batch is dropped unwritten, so its events are
    /// read again from the stored offsets.
    fn write_until_stored(&self, batch: &BatchWrite) -> Result<(), LoopError> {
        let mut failures = 0u32;
        // Restored once written: a batch committed as the loop halts on a poison
        // event must leave the projection poisoned, not running.
        let (state_before, was_assigned) = (self.fold.state(), self.fold.is_assigned());
        loop {
            let error = match self.deps.store.commit(&self.fold.generation, batch) {
                Ok(()) => break,
                // Only I/O trouble is waited out; anything else (corruption, a
                // missing column family) fails the loop as before.
                Err(error) if !error.is_io() => return Err(error.into()),
                Err(error) => error,
            };
            metrics::STORE_WRITE_FAILURES
                .with_label_values(&[&self.runtime.name])
                .inc();
            if failures == 0 {
                error!(%error, events = self.events,
                    "the store refused a batch: folding paused, offsets not advanced; retrying until it is written");
                self.fold.set_state(RunState::StoreUnavailable {
                    error: error.to_string(),
                });
            }
            failures += 1;
            let delay = Duration::from_millis(250u64 << failures.min(5));
            let until = Instant::now() + delay;
            while Instant::now() < until {
                if self.deps.shutdown.load(Ordering::Relaxed) || self.fold.stop_requested() {
                    return Err(LoopError::UnwrittenAtShutdown {
                        events: self.events,
                        error,
                    });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if failures > 0 {
            info!(
                attempts = failures + 1,
                "the store accepts writes again: batch written, folding resumed"
            );
            self.fold.set_state(state_before);
            if was_assigned {
                self.fold.set_assigned();
            }
        }
        Ok(())
    }

    /// Commits the open batch to RocksDB; returns the offsets it committed, or `None`
    /// when the batch was empty.
    fn write(&mut self) -> Result<Option<BTreeMap<SourcePartition, i64>>, LoopError> {
        let name = &self.runtime.name;
        let live = self.fold.is_live();
        if live {
            metrics::LAST_PROGRESS
                .with_label_values(&[name])
                .set(unix_seconds());
        }
        self.started = None;
        if self.offsets.is_empty() {
            return Ok(None);
        }
        let started = Instant::now();
        let batch = BatchWrite {
            rows: self
                .cache
                .drain()
                .map(|((key, partition), state)| (key, partition, state))
                .collect(),
            offsets: std::mem::take(&mut self.offsets),
        };
        self.write_until_stored(&batch)?;
        self.fold.clear_unapplied(self.unapplied_noted.iter());
        self.unapplied_noted.clear();
        self.fold.count_committed(self.events);
        let committed_ms = unix_millis();
        if live {
            let freshness = metrics::EVENT_FRESHNESS_SECONDS
                .with_label_values(&[name])
                .local();
            for timestamp in self.timestamps.drain(..) {
                freshness.observe((committed_ms - timestamp).max(0) as f64 / 1000.0);
            }
            freshness.flush();
        }
        self.timestamps.clear();
        metrics::BATCH_COMMIT_SECONDS
            .with_label_values(&[name])
            .observe(started.elapsed().as_secs_f64());
        metrics::BATCH_EVENTS.observe(self.events as f64);
        if live {
            metrics::EVENTS_APPLIED
                .with_label_values(&[name])
                .inc_by(self.events);
        }
        self.events = 0;
        Ok(Some(batch.offsets))
    }
}

/// One source partition's states as a fold sees them: the batch's cache over the
/// store.
struct BatchState<'a> {
    cache: &'a mut HashMap<CacheKey, Option<Json>>,
    store: &'a Store,
    generation: &'a crate::store::Generation,
    partition: &'a SourcePartition,
    undo: Option<&'a mut UndoLog>,
}

impl BatchState<'_> {
    fn entry(&mut self, key: &str) -> Result<&mut Option<Json>, FoldError> {
        let cache_key = (key.to_owned(), self.partition.clone());
        if let Some(undo) = self.undo.as_deref_mut() {
            if !undo.iter().any(|(k, _)| *k == cache_key) {
                undo.push((cache_key.clone(), self.cache.get(&cache_key).cloned()));
            }
        }
        Ok(match self.cache.entry(cache_key) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => {
                let stored = self
                    .store
                    .partial(self.generation, key, self.partition)
                    .map_err(|e| FoldError(format!("reading the current state of `{key}`: {e}")))?;
                entry.insert(stored)
            }
        })
    }
}

impl PartitionState for BatchState<'_> {
    fn get(&mut self, key: &str) -> Result<Option<Json>, FoldError> {
        let cache_key = (key.to_owned(), self.partition.clone());
        if let Some(cached) = self.cache.get(&cache_key) {
            return Ok(cached.clone());
        }
        self.store
            .partial(self.generation, key, self.partition)
            .map_err(|e| FoldError(format!("reading the current state of `{key}`: {e}")))
    }

    fn update(
        &mut self,
        key: &str,
        change: &mut dyn FnMut(&mut Option<Json>) -> Result<(), FoldError>,
    ) -> Result<(), FoldError> {
        change(self.entry(key)?)
    }
}

/// The consumer group of a generation: `<prefix>.<projection>` for the first,
/// `<prefix>.<projection>.g<n>` for later ones, so a replay's consumer never
/// shares partitions with the live one.
fn group_id(kafka: &KafkaConfig, generation: &crate::store::Generation) -> String {
    match generation.number {
        1 => format!("{}.{}", kafka.group_prefix, generation.projection),
        n => format!("{}.{}.g{n}", kafka.group_prefix, generation.projection),
    }
}

fn consumer_config(kafka: &KafkaConfig, generation: &crate::store::Generation) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", group_id(kafka, generation))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // Positions always come from the store (or the beginning); a position
        // outside the log must stop the projection, not silently move it.
        .set("auto.offset.reset", "error")
        .set("partition.assignment.strategy", "cooperative-sticky")
        // librdkafka prefetches up to 100,000 messages per partition by default:
        // with small events and many partitions that is hundreds of MB of queued
        // messages. 10,000 per partition keep the fold fed as long as the fetcher
        // looks again soon after the queue drops below that (its default pause is
        // 1 s, which starved the fold in `make bench`). `librdkafka_options` may
        // change both.
        .set("queued.min.messages", "10000")
        .set("fetch.queue.backoff.ms", "10");
    for (key, value) in &kafka.librdkafka_options {
        config.set(key, value);
    }
    config
}

fn unix_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn unix_seconds() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
