//! Committing open batches: one RocksDB write of the rows and offsets of every
//! fold that has something to commit (one fold, or the members of a shared
//! source: each generation's rows and offsets in its own column family, so
//! invariant 1 holds per projection), waited out while the store refuses writes;
//! then each batch's metrics and an asynchronous commit of the offsets to the
//! consumer group (informational, for external lag tools: the offsets in RocksDB
//! are the truth).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tracing::{debug, error, info};

use super::batch::Taken;
use super::consumer::SourceConsumer;
use super::member::Folding;
use super::LoopError;
use crate::backoff::Backoff;
use crate::fold_state::RunState;
use crate::metrics;
use crate::store::SourcePartition;

/// One fold's batch on its way to the store.
struct Pending {
    member: usize,
    taken: Taken,
    duplicates: u64,
    without_id: u64,
}

impl Folding {
    /// Writes this fold's open batch, then tells the group (asynchronously)
    /// where it is.
    pub(super) fn commit(&mut self, consumer: &SourceConsumer) -> Result<(), LoopError> {
        commit_all(std::slice::from_mut(self), consumer)
    }

    /// Empties the open batch into what is to be written; `None` when nothing
    /// was applied since the last commit.
    fn take_pending(&mut self, member: usize) -> Result<Option<Pending>, LoopError> {
        if self.fold.is_live() {
            metrics::LAST_PROGRESS
                .with_label_values(&[&self.supervisor.name])
                .set(unix_seconds());
        }
        let Some(mut taken) = self.batch.take(self.fold.projection.as_ref())? else {
            return Ok(None);
        };
        let (mut duplicates, mut without_id) = (0, 0);
        if let Some(dedup) = self.dedup.as_mut() {
            (taken.write.seen, taken.write.forgotten) = dedup.take();
            duplicates = std::mem::take(&mut dedup.duplicates);
            without_id = std::mem::take(&mut dedup.without_id);
        }
        Ok(Some(Pending {
            member,
            taken,
            duplicates,
            without_id,
        }))
    }

    /// What follows a written batch: lag notes, counts, metrics, the cache.
    fn written(&mut self, pending: Pending, commit_seconds: f64) {
        let name = self.supervisor.name.clone();
        let live = self.fold.is_live();
        let Taken {
            write: _,
            states,
            events,
            timestamps,
        } = pending.taken;
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
            metrics::EVENTS_APPLIED.with_label_values(&[&name]).inc_by(events);
            if self.dedup.is_some() {
                metrics::DUPLICATE_EVENTS
                    .with_label_values(&[&name])
                    .inc_by(pending.duplicates);
                metrics::EVENTS_WITHOUT_ID
                    .with_label_values(&[&name])
                    .inc_by(pending.without_id);
            }
        }
        metrics::BATCH_COMMIT_SECONDS
            .with_label_values(&[&name])
            .observe(commit_seconds);
        metrics::BATCH_EVENTS.observe(events as f64);
        self.batch.written(states);
    }
}

/// Writes the open batches of `members` in one RocksDB write, then tells the
/// group (asynchronously) the lowest offset each partition reached.
pub(super) fn commit_all(members: &mut [Folding], consumer: &SourceConsumer) -> Result<(), LoopError> {
    let mut pending = Vec::new();
    for (index, member) in members.iter_mut().enumerate() {
        if let Some(batch) = member.take_pending(index)? {
            pending.push(batch);
        }
    }
    if pending.is_empty() {
        return Ok(());
    }
    let started = Instant::now();
    write_until_stored(members, &pending)?;
    let seconds = started.elapsed().as_secs_f64();
    let mut reached: BTreeMap<SourcePartition, i64> = BTreeMap::new();
    for batch in pending {
        for (partition, next) in &batch.taken.write.offsets {
            reached
                .entry(partition.clone())
                .and_modify(|n| *n = (*n).min(*next))
                .or_insert(*next);
        }
        let member = batch.member;
        members[member].written(batch, seconds);
    }
    let mut tpl = TopicPartitionList::new();
    for (partition, next) in &reached {
        let _ = tpl.add_partition_offset(&partition.topic, partition.partition, Offset::Offset(*next));
    }
    if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
        // Group offsets are informational (external lag tools); ours are in RocksDB.
        debug!(error = %e, "async group commit failed");
    }
    Ok(())
}

/// Writes the batches, waiting out a store that refuses writes (a full disk:
/// RocksDB resumes by itself once space returns). Nothing else is folded
/// meanwhile and the batches' offsets move only with their state; reads keep
/// being served. On shutdown during the wait the batches are dropped unwritten,
/// so their events are read again from the stored offsets.
fn write_until_stored(members: &mut [Folding], pending: &[Pending]) -> Result<(), LoopError> {
    let store = members[0].deps.store.clone();
    let shutdown = members[0].deps.shutdown.clone();
    let events: u64 = pending.iter().map(|p| p.taken.events).sum();
    let mut failures = 0u32;
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(8));
    // Restored once written: a batch committed as the loop halts on a poison
    // event must leave the projection poisoned, not running.
    let before: Vec<(RunState, bool)> = pending
        .iter()
        .map(|p| {
            (
                members[p.member].fold.state(),
                members[p.member].fold.is_assigned(),
            )
        })
        .collect();
    loop {
        let batches: Vec<_> = pending
            .iter()
            .map(|p| (&members[p.member].fold.generation, &p.taken.write))
            .collect();
        let error = match store.commit_many(&batches) {
            Ok(()) => break,
            // Only I/O trouble is waited out; anything else (corruption, a
            // missing column family) fails the loop as before.
            Err(error) if !error.is_io() => return Err(error.into()),
            Err(error) => error,
        };
        for p in pending {
            let member = &members[p.member];
            metrics::STORE_WRITE_FAILURES
                .with_label_values(&[&member.supervisor.name])
                .inc();
            if failures == 0 {
                member.fold.set_state(RunState::StoreUnavailable {
                    error: error.to_string(),
                });
            }
        }
        if failures == 0 {
            error!(%error, events,
                "the store refused a batch: folding paused, offsets not advanced; retrying until it is written");
        }
        failures = failures.saturating_add(1);
        let until = Instant::now() + backoff.next_delay();
        while Instant::now() < until {
            for member in members.iter_mut() {
                member.read_commands();
            }
            if shutdown.load(Ordering::Relaxed) || members.iter().any(|m| m.stopping) {
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
        for (p, (state, was_assigned)) in pending.iter().zip(before) {
            let fold = &members[p.member].fold;
            fold.set_state(state);
            if was_assigned {
                fold.set_assigned();
            }
        }
    }
    Ok(())
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
