//! Committing the open batch: one RocksDB write of its rows and offsets, waited
//! out while the store refuses writes, then the batch's metrics and an
//! asynchronous commit of the same offsets to the consumer group (informational,
//! for external lag tools: the offsets in RocksDB are the truth).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tracing::{debug, error, info};

use super::batch::Taken;
use super::consumer::SourceConsumer;
use super::run::Folding;
use super::LoopError;
use crate::backoff::Backoff;
use crate::fold_state::RunState;
use crate::metrics;
use crate::store::{BatchWrite, SourcePartition};

impl Folding {
    /// Writes the open batch, then tells the group (asynchronously) where we are.
    pub(super) fn commit(&mut self, consumer: &SourceConsumer) -> Result<(), LoopError> {
        let Some(offsets) = self.write()? else {
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

    /// Commits the open batch to RocksDB; returns the offsets it committed, or
    /// `None` when the batch was empty.
    fn write(&mut self) -> Result<Option<BTreeMap<SourcePartition, i64>>, LoopError> {
        let name = self.supervisor.name.clone();
        let live = self.fold.is_live();
        if live {
            metrics::LAST_PROGRESS
                .with_label_values(&[&name])
                .set(unix_seconds());
        }
        let Some(Taken {
            mut write,
            states,
            events,
            timestamps,
        }) = self.batch.take(self.fold.projection.as_ref())?
        else {
            return Ok(None);
        };
        let (mut duplicates, mut without_id) = (0, 0);
        if let Some(dedup) = self.dedup.as_mut() {
            (write.seen, write.forgotten) = dedup.take();
            duplicates = std::mem::take(&mut dedup.duplicates);
            without_id = std::mem::take(&mut dedup.without_id);
        }
        let started = Instant::now();
        self.write_until_stored(&write, events)?;
        self.fold.clear_unapplied(self.unapplied_noted.iter());
        self.unapplied_noted.clear();
        self.fold.count_committed(events);
        if live {
            let committed_ms = unix_millis();
            let freshness = metrics::EVENT_FRESHNESS_SECONDS
                .with_label_values(&[&name])
                .local();
            for timestamp in timestamps {
                freshness.observe((committed_ms - timestamp).max(0) as f64 / 1000.0);
            }
            freshness.flush();
        }
        metrics::BATCH_COMMIT_SECONDS
            .with_label_values(&[&name])
            .observe(started.elapsed().as_secs_f64());
        metrics::BATCH_EVENTS.observe(events as f64);
        if live {
            metrics::EVENTS_APPLIED.with_label_values(&[&name]).inc_by(events);
            if self.dedup.is_some() {
                metrics::DUPLICATE_EVENTS
                    .with_label_values(&[&name])
                    .inc_by(duplicates);
                metrics::EVENTS_WITHOUT_ID
                    .with_label_values(&[&name])
                    .inc_by(without_id);
            }
        }
        self.batch.written(states);
        Ok(Some(write.offsets))
    }

    /// Writes `batch`, waiting out a store that refuses writes (a full disk:
    /// RocksDB resumes by itself once space returns). Nothing else is folded
    /// meanwhile and the batch's offsets move only with its state; reads keep
    /// being served. On shutdown during the wait the batch is dropped unwritten,
    /// so its events are read again from the stored offsets.
    fn write_until_stored(&mut self, batch: &BatchWrite, events: u64) -> Result<(), LoopError> {
        let mut failures = 0u32;
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(8));
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
                .with_label_values(&[&self.supervisor.name])
                .inc();
            if failures == 0 {
                error!(%error, events,
                    "the store refused a batch: folding paused, offsets not advanced; retrying until it is written");
                self.fold.set_state(RunState::StoreUnavailable {
                    error: error.to_string(),
                });
            }
            failures = failures.saturating_add(1);
            let until = Instant::now() + backoff.next_delay();
            while Instant::now() < until {
                self.read_commands();
                if self.deps.shutdown.load(Ordering::Relaxed) || self.stopping {
                    return Err(LoopError::UnwrittenAtShutdown { events, error });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if failures > 0 {
            info!(
                attempts = failures.saturating_add(1),
                "the store accepts writes again: batch written, folding resumed"
            );
            self.fold.set_state(state_before);
            if was_assigned {
                self.fold.set_assigned();
            }
        }
        Ok(())
    }
}

fn unix_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn unix_seconds() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
