//! A fold's decisions between chunks that concern its partitions and its goal:
//! stopping where a partition's log no longer holds its stored offset, a
//! replay's handover, an as-of generation's end.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::Consumer;
use tracing::{error, info, warn};

use super::consumer::SourceConsumer;
use super::member::Folding;
use super::LoopError;
use crate::fold_state::{LogBehind, RunState};
use crate::poison::PoisonReason;
use crate::store::SourcePartition;

impl Folding {
    /// After the consumer reported a fetch position outside a partition's log:
    /// finds a partition whose position lies outside `[low, high]` and stops the
    /// fold there with reason `offsets_reset` (true), rather than let the
    /// consumer jump to another position and fold new data onto old state.
    pub(super) fn stop_on_offsets_outside_the_log(
        &mut self,
        consumer: &SourceConsumer,
    ) -> Result<bool, LoopError> {
        let assignment = consumer.assignment()?;
        for element in assignment.elements() {
            let partition = SourcePartition {
                topic: element.topic().into(),
                partition: element.partition(),
            };
            let next = self.position(&partition)?;
            let Ok((low, high)) =
                consumer.fetch_watermarks(element.topic(), element.partition(), Duration::from_secs(5))
            else {
                continue;
            };
            if next < low || next > high {
                self.stop_on_log_behind(
                    consumer,
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
        Ok(false)
    }

    /// Stops the fold with reason `offsets_reset` at a partition whose log no
    /// longer holds its stored offset, rather than fold new data onto old state.
    pub(super) fn stop_on_log_behind(
        &mut self,
        consumer: &SourceConsumer,
        found: LogBehind,
    ) -> Result<(), LoopError> {
        self.commit(consumer)?;
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
        self.fold.set_state(RunState::Poisoned {
            topic: partition.topic.to_string(),
            partition: partition.partition,
            offset: next,
            reason: PoisonReason::OffsetsReset,
            error,
        });
        Ok(())
    }

    /// Handles a log-behind report of the lag monitor: only for a partition the
    /// loop still folds, still at that offset (the report may be older than a
    /// rebalance or a resume), and not polled ahead (a chunk ahead may hold the
    /// very offset the probe missed). True when the fold stopped.
    pub(super) fn handle_log_behind(
        &mut self,
        consumer: &SourceConsumer,
        polled_ahead: &dyn Fn(&SourcePartition) -> bool,
    ) -> Result<bool, LoopError> {
        let Some(found) = self.log_behind.take() else {
            return Ok(false);
        };
        let owned = consumer.assignment().is_ok_and(|assigned| {
            assigned
                .find_partition(&found.partition.topic, found.partition.partition)
                .is_some()
        });
        if owned && !polled_ahead(&found.partition) && self.position(&found.partition)? == found.next {
            self.stop_on_log_behind(consumer, found)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// A replay's part of the handover (see [`crate::supervisor`]): once the
    /// supervisor has the live generation's final offsets and this fold has
    /// folded up to them, commit and switch.
    pub(super) fn drive_replay(&mut self, consumer: &SourceConsumer) -> Result<(), LoopError> {
        let Some(replay) = self.replay.clone() else {
            return Ok(());
        };
        if Arc::ptr_eq(&self.supervisor.live(), &replay.fold) {
            // Switched by the cluster's replay record: this loop folds the live
            // generation now.
            self.replay = None;
            self.throttle = None;
            return Ok(());
        }
        let Some(target) = self.supervisor.handover_target(&replay) else {
            return Ok(());
        };
        for (partition, next) in &target {
            if self.position(partition)? < *next {
                return Ok(());
            }
        }
        self.commit(consumer)?;
        self.supervisor.switch(&replay, &self.deps.store)?;
        self.replay = None;
        self.throttle = None;
        Ok(())
    }

    /// An as-of generation's end: once every partition reached its target,
    /// commit, record it complete and stop (true). Its state is final from then on.
    pub(super) fn drive_as_of(&mut self, consumer: &SourceConsumer) -> Result<bool, LoopError> {
        let fold = self.fold.clone();
        let Some(spec) = fold.as_of.as_ref() else {
            return Ok(false);
        };
        if spec.is_complete() {
            return Ok(true);
        }
        for partition in spec.targets.keys() {
            if !spec.reached(partition, self.position(partition)?) {
                return Ok(false);
            }
        }
        self.commit(consumer)?;
        self.deps
            .store
            .complete_as_of(&self.supervisor.name, spec.until_ms)?;
        spec.set_complete();
        info!(until = %spec.until_text(), "as-of generation complete: its state is final");
        fold.set_state(RunState::Stopped);
        Ok(true)
    }
}

/// Logs that the consumer reported an offset out of range that no fold's
/// position explains.
pub(super) fn unexplained_offset_error() {
    warn!("the consumer reported an offset out of range, but every stored offset is inside its log");
}
