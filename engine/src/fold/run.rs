//! The loop itself: poll a chunk, hand it to the decoding thread, fold the chunk
//! decoded before it message by message, commit when the batch is due, and handle
//! rebalances, log-behind reports and a replay's handover between chunks.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::message::{BorrowedMessage, Message};
use tracing::{error, info, warn};

use super::batch::Batch;
use super::consumer::{self, SourceConsumer};
use super::dedup::Dedup;
use super::facts::Facts;
use super::message::ChunkFolder;
use super::{LoopEnd, LoopError, SourceDeps};
use crate::config::PoisonPolicy;
use crate::dead_letter::DeadLetters;
use crate::decode_ahead::DecodeAhead;
use crate::fold_state::{Command, Fold, LogBehind, RunState};
use crate::poison::PoisonReason;
use crate::replay::Replay;
use crate::store::{SourcePartition, StoreError};
use crate::supervisor::Supervisor;

pub(super) struct FoldLoop {
    consumer: SourceConsumer,
    dead_letters: Option<DeadLetters>,
    folding: Folding,
}

/// Everything of the loop but the consumer, so a message borrowed from the
/// consumer can be folded into it.
pub(super) struct Folding {
    pub(super) supervisor: Arc<Supervisor>,
    pub(super) fold: Arc<Fold>,
    /// Set while this loop builds a replay's generation.
    replay: Option<Arc<Replay>>,
    /// When a throttled replay started counting, and the events since.
    throttle: Option<(Instant, u64, u32)>,
    pub(super) decode_ahead: DecodeAhead,
    pub(super) deps: SourceDeps,
    /// Next offset to apply per partition, as far as this loop knows (committed
    /// or in the open batch).
    pub(super) positions: HashMap<SourcePartition, i64>,
    topics: HashMap<String, Arc<str>>,
    pub(super) batch: Batch,
    /// Partitions whose first unapplied event of this batch was noted for lag.
    pub(super) unapplied_noted: HashSet<SourcePartition>,
    /// What the supervisor and the lag monitor tell this loop.
    commands: Receiver<Command>,
    /// A [`Command::Stop`] came: commit and stop.
    pub(super) stopping: bool,
    /// A [`Command::LogBehind`] came and is not handled yet.
    log_behind: Option<LogBehind>,
    /// Where the projection's event ids and times are.
    pub(super) facts: Facts,
    /// The ids folded, when the projection folds each id once.
    pub(super) dedup: Option<Dedup>,
}

impl FoldLoop {
    pub(super) fn new(
        supervisor: Arc<Supervisor>,
        fold: Arc<Fold>,
        replay: Option<Arc<Replay>>,
        commands: Receiver<Command>,
        decoder: crate::decode::Decoder,
        deps: SourceDeps,
    ) -> Result<Self, LoopError> {
        let dead_letters = match (&supervisor.on_poison, &supervisor.dead_letter_topic) {
            (PoisonPolicy::DeadLetter, Some(topic)) => {
                Some(DeadLetters::new(&deps.kafka, topic, deps.async_runtime.clone())?)
            }
            _ => None,
        };
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
        let consumer = consumer::subscribe(&deps.kafka, deps.store.clone(), fold.clone())?;
        let batch = Batch::new(deps.store_config.state_cache_bytes());
        let facts = Facts::new(supervisor.dedup.as_ref(), supervisor.event_time.as_deref())
            .map_err(|e| LoopError::Config(e.to_string()))?;
        let dedup = supervisor.dedup.as_ref().map(Dedup::new);
        Ok(FoldLoop {
            consumer,
            dead_letters,
            folding: Folding {
                supervisor,
                fold,
                replay,
                throttle,
                decode_ahead,
                deps,
                positions: HashMap::new(),
                topics: HashMap::new(),
                batch,
                unapplied_noted: HashSet::new(),
                commands,
                stopping: false,
                log_behind: None,
                facts,
                dedup,
            },
        })
    }

    /// The command channel, for the loop that starts over after this one.
    pub(super) fn into_commands(mut self) -> Receiver<Command> {
        std::mem::replace(&mut self.folding.commands, std::sync::mpsc::channel().1)
    }

    pub(super) fn run(&mut self) -> Result<LoopEnd, LoopError> {
        let fold = self.folding.fold.clone();
        fold.set_state(RunState::Running);
        let consumer = &self.consumer;
        let folding = &mut self.folding;
        let folder = ChunkFolder {
            supervisor: folding.supervisor.clone(),
            fold: fold.clone(),
            dead_letters: self.dead_letters.as_ref(),
            max_wait: Duration::from_millis(folding.deps.store_config.batch_max_wait_ms),
            max_events: folding.deps.store_config.batch_max_events as u64,
        };
        // Messages polled and being decoded while the chunk before them is folded.
        let mut ahead: Option<Vec<BorrowedMessage<'_>>> = None;
        loop {
            folding.read_commands();
            if folding.deps.shutdown.load(Ordering::Relaxed) || folding.stopping {
                // A chunk still ahead was not applied: it is read again next time.
                folding.commit(consumer)?;
                info!("stopping: batch committed");
                fold.set_state(RunState::Stopped);
                return Ok(LoopEnd::Stopped);
            }
            drive_replay(consumer, folding)?;
            if drive_as_of(consumer, folding)? {
                return Ok(LoopEnd::Stopped);
            }
            if let Some(found) = folding.log_behind.take() {
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
                if owned && !polled_ahead && folding.position(&found.partition)? == found.next {
                    stop_on_log_behind(consumer, folding, found)?;
                    return Ok(LoopEnd::Stopped);
                }
            }
            let wait = if ahead.is_some() {
                Duration::ZERO
            } else {
                Duration::from_millis(50)
            };
            let polled = consumer::poll_chunk(consumer, wait);
            if !polled.messages.is_empty() {
                let max_bytes = folding.supervisor.max_event_bytes;
                // Values over the limit are poison without being decoded.
                folding.decode_ahead.submit(
                    polled
                        .messages
                        .iter()
                        .map(|m| (m.payload().filter(|v| v.len() <= max_bytes), m.key())),
                )?;
            }
            if let Some(previous) = ahead.take() {
                if let Some(end) = folder.fold_chunk(consumer, folding, previous)?.loop_end() {
                    return Ok(end);
                }
            }
            // A rebalance or an offset error is handled with every message polled
            // before it folded, as when messages were taken one at a time.
            let rebalanced = consumer::rebalance_pending(consumer);
            if rebalanced || polled.offsets_outside_log || polled.messages.is_empty() {
                if !polled.messages.is_empty() {
                    if let Some(end) = folder.fold_chunk(consumer, folding, polled.messages)?.loop_end() {
                        return Ok(end);
                    }
                }
                if rebalanced {
                    handle_rebalance(consumer, folding)?;
                }
                if polled.offsets_outside_log && stop_on_offsets_outside_the_log(consumer, folding)? {
                    return Ok(LoopEnd::Stopped);
                }
                if !rebalanced && !polled.offsets_outside_log {
                    // Nothing more to read right now: write what was folded.
                    folding.commit(consumer)?;
                }
            } else {
                ahead = Some(polled.messages);
            }
        }
    }
}

impl Drop for FoldLoop {
    fn drop(&mut self) {
        // Runs before the consumer is closed: its last revocation keeps ownership.
        self.consumer
            .context()
            .closing
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn handle_rebalance(consumer: &SourceConsumer, folding: &mut Folding) -> Result<(), LoopError> {
    if let Some(error) = consumer.context().assignment_error.lock().expect("lock").take() {
        folding.commit(consumer)?;
        return Err(LoopError::Assignment(error));
    }
    let revoked: Vec<SourcePartition> =
        std::mem::take(&mut *consumer.context().revoked.lock().expect("lock"));
    if !revoked.is_empty() {
        // The open batch is consistent (state and offsets of the events already
        // folded), so it is committed as it is; the partitions' positions are
        // forgotten and read from the store again if they come back, as are
        // their states (another worker may fold them meanwhile).
        folding.commit(consumer)?;
        for partition in revoked {
            folding.positions.remove(&partition);
            folding.batch.drop_partition(&partition);
            if let Some(dedup) = folding.dedup.as_mut() {
                dedup.drop_partition(&partition);
            }
        }
    }
    Ok(())
}

/// After the consumer reported a fetch position outside a partition's log: finds
/// the partition whose stored offset lies outside `[low, high]` and stops the
/// projection there with reason `offsets_reset` (true), rather than let the
/// consumer jump to another position and fold new data onto old state.
fn stop_on_offsets_outside_the_log(
    consumer: &SourceConsumer,
    folding: &mut Folding,
) -> Result<bool, LoopError> {
    let assignment = consumer.assignment()?;
    for element in assignment.elements() {
        let partition = SourcePartition {
            topic: folding.intern(element.topic()),
            partition: element.partition(),
        };
        let next = folding.position(&partition)?;
        let Ok((low, high)) =
            consumer.fetch_watermarks(element.topic(), element.partition(), Duration::from_secs(5))
        else {
            continue;
        };
        if next < low || next > high {
            stop_on_log_behind(
                consumer,
                folding,
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
    consumer: &SourceConsumer,
    folding: &mut Folding,
    found: LogBehind,
) -> Result<(), LoopError> {
    folding.commit(consumer)?;
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
    folding.fold.set_state(RunState::Poisoned {
        topic: partition.topic.to_string(),
        partition: partition.partition,
        offset: next,
        reason: PoisonReason::OffsetsReset,
        error,
    });
    Ok(())
}

/// A replay's part of the handover (see [`crate::supervisor`]): once the
/// supervisor has the live generation's final offsets and this loop has folded up
/// to them, commit and switch.
fn drive_replay(consumer: &SourceConsumer, folding: &mut Folding) -> Result<(), LoopError> {
    let Some(replay) = folding.replay.clone() else {
        return Ok(());
    };
    let Some(target) = folding.supervisor.handover_target(&replay) else {
        return Ok(());
    };
    for (partition, next) in &target {
        if folding.position(partition)? < *next {
            return Ok(());
        }
    }
    folding.commit(consumer)?;
    folding.supervisor.switch(&replay, &folding.deps.store)?;
    folding.replay = None;
    folding.throttle = None;
    Ok(())
}

/// An as-of generation's end: once every partition reached its target, commit,
/// record it complete and stop (true). Its state is final from then on.
fn drive_as_of(consumer: &SourceConsumer, folding: &mut Folding) -> Result<bool, LoopError> {
    let fold = folding.fold.clone();
    let Some(spec) = fold.as_of.as_ref() else {
        return Ok(false);
    };
    if spec.is_complete() {
        return Ok(true);
    }
    for partition in spec.targets.keys() {
        if !spec.reached(partition, folding.position(partition)?) {
            return Ok(false);
        }
    }
    folding.commit(consumer)?;
    folding
        .deps
        .store
        .complete_as_of(&folding.supervisor.name, spec.until_ms)?;
    spec.set_complete();
    info!(until = %spec.until_text(), "as-of generation complete: its state is final");
    fold.set_state(RunState::Stopped);
    Ok(true)
}

impl Folding {
    /// Takes in what the supervisor and the lag monitor said since last time.
    pub(super) fn read_commands(&mut self) {
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Stop => self.stopping = true,
                Command::LogBehind(found) => self.log_behind = Some(found),
            }
        }
    }

    pub(super) fn intern(&mut self, topic: &str) -> Arc<str> {
        if let Some(interned) = self.topics.get(topic) {
            return interned.clone();
        }
        let interned: Arc<str> = topic.into();
        self.topics.insert(topic.to_owned(), interned.clone());
        interned
    }

    /// Holds a throttled replay to its configured rate.
    pub(super) fn throttle(&mut self) {
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
    pub(super) fn position(&mut self, partition: &SourcePartition) -> Result<i64, StoreError> {
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
}
