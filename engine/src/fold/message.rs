//! The loop's decisions for each message of a chunk, in message order: drop a
//! redelivery, note the oldest unapplied event for lag, apply an operator's skip,
//! pass over an id folded before ([`super::dedup`]), fold, or hand a bad event
//! to the poison policy; then advance the batch and commit it when it is due.

use std::sync::atomic::Ordering;

use rdkafka::message::{BorrowedMessage, Message};
use tracing::{debug, error, info, warn};

use super::batch::Stop;
use super::consumer::SourceConsumer;
use super::dedup;
use super::member::Folding;
use super::policy::{self, Outcome, Poison};
use super::{LoopEnd, LoopError};
use crate::decode::DecodeError;
use crate::decode_ahead::Decoded;
use crate::fold_state::RunState;
use crate::metrics;
use crate::poison::PoisonReason;
use crate::projection::EventMeta;
use crate::store::{SeenId, SourcePartition};

/// What became of a message that was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Applied {
    /// Its events were folded.
    Folded,
    /// Its id was folded before: passed over.
    Duplicate,
    /// An as-of generation passes over events after its time or written after
    /// its request.
    PassedOver,
}

/// Whether a fold goes on after a message.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ChunkEnd {
    Folded,
    /// Stopped at a message (poison under `stop`, or shutdown mid-message).
    LoopEnded,
    /// A fold panicked: the open batch must be dropped and folded again.
    Refold,
}

impl ChunkEnd {
    /// How the fold's loop ends after this message, if it does.
    pub(super) fn loop_end(self) -> Option<LoopEnd> {
        match self {
            ChunkEnd::Folded => None,
            ChunkEnd::LoopEnded => Some(LoopEnd::Stopped),
            ChunkEnd::Refold => Some(LoopEnd::Refold),
        }
    }
}

impl Folding {
    /// The fold's decisions for one message (of `partition`), decoded as
    /// `decoded`, in message order.
    pub(super) fn fold_message(
        &mut self,
        consumer: &SourceConsumer,
        message: &BorrowedMessage<'_>,
        partition: &SourcePartition,
        decoded: &Decoded,
    ) -> Result<ChunkEnd, LoopError> {
        let fold = self.fold.clone();
        let supervisor = self.supervisor.clone();
        let offset = message.offset();
        let next = self.position(partition)?;
        if offset >= next && self.unapplied_noted.insert(partition.clone()) {
            fold.note_unapplied(partition, message.timestamp().to_millis().unwrap_or(0));
        }
        if offset < next {
            debug!(topic = %partition.topic, partition = partition.partition, offset, next, "already applied; dropped");
            return Ok(ChunkEnd::Folded);
        }
        let shutdown = self.deps.shutdown.clone();
        let keep_waiting = move || !shutdown.load(Ordering::Relaxed);
        let poison = |reason, error| Poison {
            message,
            partition,
            reason,
            error,
        };
        // Everything applied counts as applied (a skip by policy too), but
        // events passed over (duplicates, after an as-of's time).
        let mut counted = true;
        let outcome = if fold.take_skip(&partition.topic, partition.partition, offset) {
            metrics::OPERATOR_SKIPS
                .with_label_values(&[&supervisor.name])
                .inc();
            warn!(topic = %partition.topic, partition = partition.partition, offset,
                "operator skip: event at {partition} offset {offset} skipped without folding");
            Outcome::Applied
        } else if let Some(panic) = fold.take_known_panic(partition, offset) {
            // Folded again after this event's fold panicked: it is poison now.
            let poison = poison(PoisonReason::FoldFailed, panic);
            policy::handle(
                &supervisor,
                &fold,
                self.dead_letters.as_ref(),
                poison,
                &keep_waiting,
            )?
        } else {
            match self.apply(message, partition, decoded) {
                Ok(applied) => {
                    counted = applied == Applied::Folded;
                    Outcome::Applied
                }
                Err(Stop::Interrupted) => Outcome::Retry,
                Err(Stop::Store(error)) => return Err(error.into()),
                Err(Stop::Panicked(panic)) => {
                    error!(topic = %partition.topic, partition = partition.partition, offset, error = %panic,
                        "the fold of {partition} offset {offset} {panic}: the open batch is dropped unwritten \
                         and folded again from the stored offsets, with this event as poison (fold_failed)");
                    fold.remember_panic(partition, offset, panic);
                    return Ok(ChunkEnd::Refold);
                }
                Err(Stop::Poison { reason, error }) => {
                    let poison = poison(reason, error);
                    policy::handle(
                        &supervisor,
                        &fold,
                        self.dead_letters.as_ref(),
                        poison,
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
                self.commit(consumer)?;
                info!("stopping mid-message: batch committed");
                fold.set_state(RunState::Stopped);
                return Ok(ChunkEnd::LoopEnded);
            }
            Outcome::Halt => {
                let timestamp = message.timestamp().to_millis().unwrap_or(0);
                self.commit(consumer)?;
                // The event it stopped at stays unapplied: its age is the lag.
                fold.note_unapplied(partition, timestamp);
                return Ok(ChunkEnd::LoopEnded);
            }
        }
        self.positions.insert(partition.clone(), offset + 1);
        self.batch.advance(
            partition.clone(),
            offset + 1,
            message.timestamp().to_millis(),
            counted,
        );
        self.throttle();
        Ok(ChunkEnd::Folded)
    }
}

impl Folding {
    /// Decodes, upcasts and folds one message into the batch.
    pub(super) fn apply(
        &mut self,
        message: &BorrowedMessage<'_>,
        partition: &SourcePartition,
        decoded: &Decoded,
    ) -> Result<Applied, Stop> {
        let as_of = self.fold.as_of.as_ref();
        if as_of.is_some_and(|spec| spec.is_past_target(partition, message.offset())) {
            // Written after the as-of's request: not its to read, even undecodable.
            return Ok(Applied::PassedOver);
        }
        let size = message.payload_len();
        if size > self.supervisor.max_event_bytes {
            return Err(Stop::Poison {
                reason: PoisonReason::BadFrame,
                error: format!(
                    "value of {size} bytes exceeds max_event_bytes = {}",
                    self.supervisor.max_event_bytes
                ),
            });
        }
        let decoded = decoded.as_ref().map_err(|e| match e {
            DecodeError::Poison { reason, message } => Stop::Poison {
                reason: *reason,
                error: message.clone(),
            },
            DecodeError::Interrupted(_) => Stop::Interrupted,
        })?;
        let meta = EventMeta {
            topic: partition.topic.clone(),
            partition: partition.partition,
            offset: message.offset(),
            timestamp_ms: message.timestamp().to_millis(),
            key: decoded.key.clone(),
        };
        let events = &decoded.events;
        if let Some(spec) = &self.fold.as_of {
            let time = self
                .facts
                .event_time(events, &meta)
                .map_err(|error| Stop::Poison {
                    reason: PoisonReason::FoldFailed,
                    error: format!("reading the event time: {error}"),
                })?;
            let Some(time) = time else {
                return Err(Stop::Poison {
                    reason: PoisonReason::FoldFailed,
                    error: "the event has no time for the as-of generation (no record timestamp)".into(),
                });
            };
            if time > spec.until_ms {
                return Ok(Applied::PassedOver);
            }
        }
        let mut remember = None;
        if let Some(dedup) = self.dedup.as_mut() {
            let id = self
                .facts
                .event_id(message.headers(), events, &meta)
                .map_err(|error| Stop::Poison {
                    reason: PoisonReason::FoldFailed,
                    error: format!("reading the event id: {error}"),
                })?;
            match id {
                None => dedup.without_id += 1,
                Some(id) => {
                    let digest = dedup::digest(&id);
                    if dedup
                        .is_duplicate(&self.deps.store, &self.fold.generation, partition, &digest)
                        .map_err(Stop::Store)?
                    {
                        debug!(topic = %partition.topic, partition = partition.partition, offset = meta.offset,
                            "event id folded before; passed over");
                        dedup.duplicates += 1;
                        return Ok(Applied::Duplicate);
                    }
                    remember = Some(digest);
                }
            }
        }
        let source = (&*self.deps.store, &self.fold.generation);
        self.batch
            .fold_message(self.fold.projection.as_ref(), source, events, &meta, partition)?;
        if let (Some(dedup), Some(digest)) = (self.dedup.as_mut(), remember) {
            let seen = SeenId {
                offset: meta.offset,
                digest,
                timestamp_ms: meta.timestamp_ms.unwrap_or(0),
            };
            dedup.remember(partition, seen);
        }
        Ok(Applied::Folded)
    }
}
