//! The loop itself: poll a chunk, hand it to the decoding thread, fold the chunk
//! decoded before it message by message into each fold of the loop, commit when
//! a batch is due, and handle rebalances, log-behind reports, a replay's
//! handover and joins between chunks.
//!
//! A loop folds one fold on a consumer of its own ([`FoldLoop::solo`]), or every
//! member of a shared source ([`FoldLoop::shared`], see [`super::source`]). A
//! solo loop's fold stopping ends the loop; a shared source's member stopping
//! leaves it, and the others fold on.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::message::{BorrowedMessage, Message};
use tracing::info;

use super::commit::commit_all;
use super::consumer::{self, SourceConsumer};
use super::member::Folding;
use super::partitions::unexplained_offset_error;
use super::source::SharedSource;
use super::PARALLEL_CHUNK;
use super::{LoopEnd, LoopError, SourceDeps};
use crate::decode_ahead::{DecodeAhead, Decoded};
use crate::fold_state::{Command, Fold, RunState};
use crate::replay::Replay;
use crate::store::SourcePartition;
use crate::supervisor::Supervisor;

pub(super) struct FoldLoop {
    consumer: SourceConsumer,
    state: LoopState,
}

/// Everything of the loop but the consumer, so messages borrowed from the
/// consumer can be folded into it.
pub(super) struct LoopState {
    pub(super) decode_ahead: DecodeAhead,
    /// The folds of this loop: one for a solo loop, the members of a shared source.
    pub(super) members: Vec<Folding>,
    /// Set for a shared source: where it takes joins and publishes positions.
    pub(super) shared: Option<Arc<SharedSource>>,
    /// For a solo loop of a live generation: the shared source it may join.
    pub(super) joinable: Option<Arc<SharedSource>>,
    pub(super) last_join_check: Instant,
    pub(super) deps: SourceDeps,
    topics: HashMap<String, Arc<str>>,
}

impl FoldLoop {
    /// A loop of its own for `fold`.
    pub(super) fn solo(
        supervisor: Arc<Supervisor>,
        fold: Arc<Fold>,
        replay: Option<Arc<Replay>>,
        commands: Receiver<Command>,
        decoder: crate::decode::Decoder,
        deps: SourceDeps,
    ) -> Result<Self, LoopError> {
        let decode_ahead = DecodeAhead::start(
            decoder,
            format!("decode-{}", fold.generation.column_family()),
            deps.shutdown.clone(),
        )
        .map_err(LoopError::DecoderThread)?;
        let consumer = consumer::subscribe(&deps.kafka, deps.store.clone(), vec![fold.clone()], false)?;
        let joinable = if fold.as_of.is_none() {
            deps.source_of(&fold.topics)
        } else {
            None
        };
        let cache = deps.store_config.state_cache_bytes();
        let member = Folding::new(supervisor, fold, replay, commands, deps.clone(), cache)?;
        Ok(FoldLoop {
            consumer,
            state: LoopState {
                decode_ahead,
                members: vec![member],
                shared: None,
                joinable,
                last_join_check: Instant::now(),
                deps,
                topics: HashMap::new(),
            },
        })
    }

    /// The loop of the shared source `source`, folding `members` (live
    /// generations of projections reading its topics).
    pub(super) fn shared(
        source: Arc<SharedSource>,
        members: Vec<(Arc<Supervisor>, Arc<Fold>)>,
        decoder: crate::decode::Decoder,
        deps: SourceDeps,
    ) -> Result<Self, LoopError> {
        let decode_ahead = DecodeAhead::start(
            decoder,
            format!("decode-{}", source.topics.join("+")),
            deps.shutdown.clone(),
        )
        .map_err(LoopError::DecoderThread)?;
        let folds = members.iter().map(|(_, fold)| fold.clone()).collect();
        let consumer = consumer::subscribe(&deps.kafka, deps.store.clone(), folds, true)?;
        let mut folding = Vec::new();
        for (supervisor, fold) in members {
            fold.set_shared(true);
            let commands = fold.listen();
            let cache = source.cache_share(deps.store_config.state_cache_bytes());
            folding.push(Folding::new(
                supervisor,
                fold,
                None,
                commands,
                deps.clone(),
                cache,
            )?);
        }
        Ok(FoldLoop {
            consumer,
            state: LoopState {
                decode_ahead,
                members: folding,
                shared: Some(source),
                joinable: None,
                last_join_check: Instant::now(),
                deps,
                topics: HashMap::new(),
            },
        })
    }

    /// The folds still in the loop when it ended.
    pub(super) fn into_members(mut self) -> Vec<Folding> {
        std::mem::take(&mut self.state.members)
    }

    pub(super) fn run(&mut self) -> Result<LoopEnd, LoopError> {
        for member in &self.state.members {
            member.fold.set_state(RunState::Running);
        }
        let consumer = &self.consumer;
        let state = &mut self.state;
        // Messages polled and being decoded while the chunk before them is folded.
        let mut ahead: Option<Vec<BorrowedMessage<'_>>> = None;
        loop {
            for member in &mut state.members {
                member.read_commands();
            }
            if state.deps.shutdown.load(Ordering::Relaxed) {
                // A chunk still ahead was not applied: it is read again next time.
                commit_all(&mut state.members, consumer)?;
                info!("stopping: batch committed");
                for member in &state.members {
                    member.fold.set_state(RunState::Stopped);
                }
                return Ok(LoopEnd::Stopped);
            }
            if let Some(end) = state.between_chunks(consumer, &ahead)? {
                return Ok(end);
            }
            if state.shared.as_ref().is_some_and(|s| s.has_joining()) {
                // Newcomers join with everything polled folded, so the consumer's
                // position is where every member stands.
                if let Some(previous) = ahead.take() {
                    if let Some(end) = state.fold_chunk(consumer, previous)? {
                        return Ok(end);
                    }
                }
                state.adopt(consumer)?;
            }
            if let Some(end) = state.try_join(consumer)? {
                return Ok(end);
            }
            let wait = if ahead.is_some() {
                Duration::ZERO
            } else {
                Duration::from_millis(50)
            };
            let polled = consumer::poll_chunk(consumer, wait);
            if !polled.messages.is_empty() {
                let max_bytes = state
                    .members
                    .iter()
                    .map(|m| m.supervisor.max_event_bytes)
                    .max()
                    .unwrap_or(0);
                // Values over the limit are poison without being decoded.
                state.decode_ahead.submit(
                    polled
                        .messages
                        .iter()
                        .map(|m| (m.payload().filter(|v| v.len() <= max_bytes), m.key())),
                )?;
            }
            if let Some(previous) = ahead.take() {
                if let Some(end) = state.fold_chunk(consumer, previous)? {
                    return Ok(end);
                }
            }
            // A rebalance or an offset error is handled with every message polled
            // before it folded, as when messages were taken one at a time.
            let rebalanced = consumer::rebalance_pending(consumer);
            if rebalanced || polled.offsets_outside_log || polled.messages.is_empty() {
                if !polled.messages.is_empty() {
                    if let Some(end) = state.fold_chunk(consumer, polled.messages)? {
                        return Ok(end);
                    }
                }
                if rebalanced {
                    state.handle_rebalance(consumer)?;
                }
                if polled.offsets_outside_log {
                    if let Some(end) = state.stop_on_offsets_outside_the_log(consumer)? {
                        return Ok(end);
                    }
                }
                if !rebalanced && !polled.offsets_outside_log {
                    // Nothing more to read right now: write what was folded.
                    state.commit(consumer)?;
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

impl LoopState {
    /// Commits every member's batch in one write and publishes where they are.
    pub(super) fn commit(&mut self, consumer: &SourceConsumer) -> Result<(), LoopError> {
        commit_all(&mut self.members, consumer)?;
        self.publish(consumer)
    }

    /// A shared source publishes its members' lowest next offset per assigned
    /// partition, for folds that want to join.
    pub(super) fn publish(&mut self, consumer: &SourceConsumer) -> Result<(), LoopError> {
        let Some(source) = self.shared.clone() else {
            return Ok(());
        };
        let assignment = consumer.context().assignment.lock().expect("lock").clone();
        let mut positions = BTreeMap::new();
        for partition in assignment {
            let mut lowest = i64::MAX;
            for member in &mut self.members {
                lowest = lowest.min(member.position(&partition)?);
            }
            positions.insert(partition, lowest);
        }
        source.publish(positions);
        Ok(())
    }

    /// Member `index` ended its part in the loop. In a solo loop that ends the
    /// loop; a shared source's member leaves (the others fold on) and its end is
    /// handled here as the thread's end handles a solo loop's.
    pub(super) fn member_ended(
        &mut self,
        consumer: &SourceConsumer,
        index: usize,
        end: LoopEnd,
    ) -> Option<LoopEnd> {
        if self.shared.is_none() {
            return Some(end);
        }
        let member = self.members.remove(index);
        let (supervisor, fold) = (member.supervisor.clone(), member.fold.clone());
        fold.set_shared(false);
        consumer
            .context()
            .folds
            .lock()
            .expect("lock")
            .retain(|f| !Arc::ptr_eq(f, &fold));
        let shutting_down = self.deps.shutdown.load(Ordering::Relaxed);
        info!(projection = %supervisor.name, "left the shared source");
        match end {
            LoopEnd::Refold if !shutting_down => {
                fold.hand_on(member.into_commands());
                fold.stop_serving_all();
                supervisor.spawn(fold);
            }
            _ => supervisor.loop_exited(&fold, &self.deps.store, shutting_down),
        }
        self.members.is_empty().then_some(LoopEnd::Stopped)
    }

    /// Each member's decisions between chunks: a stop it was told, a replay's
    /// handover, an as-of generation's end, a log found behind its offsets.
    fn between_chunks(
        &mut self,
        consumer: &SourceConsumer,
        ahead: &Option<Vec<BorrowedMessage<'_>>>,
    ) -> Result<Option<LoopEnd>, LoopError> {
        let polled_ahead = |partition: &SourcePartition| {
            ahead
                .iter()
                .flatten()
                .any(|m| m.partition() == partition.partition && m.topic() == &*partition.topic)
        };
        let mut index = 0;
        while index < self.members.len() {
            let member = &mut self.members[index];
            let stopped = if member.stopping {
                // Told to stop (a handover, an abort): commit and stop.
                member.commit(consumer)?;
                info!(projection = %member.supervisor.name, "stopping: batch committed");
                member.fold.set_state(RunState::Stopped);
                true
            } else {
                member.drive_replay(consumer)?;
                member.drive_as_of(consumer)? || member.handle_log_behind(consumer, &polled_ahead)?
            };
            if !stopped {
                index += 1;
                continue;
            }
            if let Some(end) = self.member_ended(consumer, index, LoopEnd::Stopped) {
                return Ok(Some(end));
            }
        }
        Ok(None)
    }

    /// Folds `messages`, the oldest chunk submitted for decoding, in order, into
    /// every member; commits when a member's batch is due.
    fn fold_chunk(
        &mut self,
        consumer: &SourceConsumer,
        messages: Vec<BorrowedMessage<'_>>,
    ) -> Result<Option<LoopEnd>, LoopError> {
        let decoded = self.decode_ahead.next()?;
        let end = self.fold_decoded_chunk(consumer, &messages, &decoded);
        self.decode_ahead.recycle(decoded);
        end
    }

    fn fold_decoded_chunk(
        &mut self,
        consumer: &SourceConsumer,
        messages: &[BorrowedMessage<'_>],
        decoded: &[Decoded],
    ) -> Result<Option<LoopEnd>, LoopError> {
        if self.members.len() >= 2 && messages.len() >= PARALLEL_CHUNK {
            return self.fold_chunk_in_parallel(consumer, messages, decoded);
        }
        let last = messages.len().saturating_sub(1);
        for (at, (message, decoded)) in messages.iter().zip(decoded).enumerate() {
            let partition = SourcePartition {
                topic: self.intern(message.topic()),
                partition: message.partition(),
            };
            let mut index = 0;
            while index < self.members.len() {
                let end = self.members[index].fold_message(consumer, message, &partition, decoded)?;
                match end.loop_end() {
                    None => index += 1,
                    Some(end) => {
                        if let Some(end) = self.member_ended(consumer, index, end) {
                            return Ok(Some(end));
                        }
                    }
                }
            }
            // The clock is read every 64 messages and at the chunk's end, not per
            // message.
            let check_clock = at == last || at % 64 == 63;
            if self.members.iter().any(|m| m.is_due(check_clock)) {
                self.commit(consumer)?;
            }
        }
        Ok(None)
    }

    pub(super) fn intern(&mut self, topic: &str) -> Arc<str> {
        if let Some(interned) = self.topics.get(topic) {
            return interned.clone();
        }
        let interned: Arc<str> = topic.into();
        self.topics.insert(topic.to_owned(), interned.clone());
        interned
    }

    fn handle_rebalance(&mut self, consumer: &SourceConsumer) -> Result<(), LoopError> {
        if let Some(error) = consumer.context().assignment_error.lock().expect("lock").take() {
            commit_all(&mut self.members, consumer)?;
            return Err(LoopError::Assignment(error));
        }
        let revoked: Vec<SourcePartition> =
            std::mem::take(&mut *consumer.context().revoked.lock().expect("lock"));
        if !revoked.is_empty() {
            // The open batches are consistent (state and offsets of the events
            // already folded), so they are committed as they are; the
            // partitions' positions are forgotten and read from the store again
            // if they come back, as are their states (another worker may fold
            // them meanwhile).
            commit_all(&mut self.members, consumer)?;
            for partition in revoked {
                for member in &mut self.members {
                    member.forget_partition(&partition);
                }
            }
        }
        self.publish(consumer)
    }

    /// After the consumer reported a fetch position outside a partition's log:
    /// stops each fold whose position lies outside it (reason `offsets_reset`).
    fn stop_on_offsets_outside_the_log(
        &mut self,
        consumer: &SourceConsumer,
    ) -> Result<Option<LoopEnd>, LoopError> {
        let mut index = 0;
        let mut any = false;
        while index < self.members.len() {
            if !self.members[index].stop_on_offsets_outside_the_log(consumer)? {
                index += 1;
                continue;
            }
            any = true;
            if let Some(end) = self.member_ended(consumer, index, LoopEnd::Stopped) {
                return Ok(Some(end));
            }
        }
        if !any {
            unexplained_offset_error();
        }
        Ok(None)
    }
}
