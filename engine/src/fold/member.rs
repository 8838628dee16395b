//! One fold as a loop folds it: its generation, its open batch and positions,
//! its commands, its poison policy, its event ids. A loop of its own folds one;
//! a shared source folds several from one consumer and one decoding thread
//! ([`super::source`]).

use std::collections::{HashMap, HashSet};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::batch::Batch;
use super::dedup::Dedup;
use super::facts::Facts;
use super::{LoopError, SourceDeps};
use crate::config::PoisonPolicy;
use crate::dead_letter::DeadLetters;
use crate::fold_state::{Command, Fold, LogBehind};
use crate::replay::Replay;
use crate::store::{SourcePartition, StoreError};
use crate::supervisor::Supervisor;

/// One fold of a loop, with everything of it but the consumer, so a message
/// borrowed from the consumer can be folded into it.
pub(super) struct Folding {
    pub(super) supervisor: Arc<Supervisor>,
    pub(super) fold: Arc<Fold>,
    /// Set while this loop builds a replay's generation.
    pub(super) replay: Option<Arc<Replay>>,
    /// When a throttled replay started counting, and the events since.
    pub(super) throttle: Option<(Instant, u64, u32)>,
    pub(super) deps: SourceDeps,
    /// Next offset to apply per partition, as far as this loop knows (committed
    /// or in the open batch).
    pub(super) positions: HashMap<SourcePartition, i64>,
    pub(super) batch: Batch,
    /// Partitions whose first unapplied event of this batch was noted for lag.
    pub(super) unapplied_noted: HashSet<SourcePartition>,
    /// What the supervisor and the lag monitor tell this fold.
    pub(super) commands: Receiver<Command>,
    /// A [`Command::Stop`] came: commit and stop.
    pub(super) stopping: bool,
    /// A [`Command::LogBehind`] came and is not handled yet.
    pub(super) log_behind: Option<LogBehind>,
    /// Where the projection's event ids and times are.
    pub(super) facts: Facts,
    /// The ids folded, when the projection folds each id once.
    pub(super) dedup: Option<Dedup>,
    /// The dead-letter producer under `on_poison = "dead_letter"`.
    pub(super) dead_letters: Option<DeadLetters>,
    /// A batch is due after this many events...
    pub(super) max_events: u64,
    /// ...or this long after its first.
    pub(super) max_wait: Duration,
}

impl Folding {
    /// `fold` of `supervisor`'s projection, taking commands on `commands`; its
    /// committed states share `cache_bytes`.
    pub(super) fn new(
        supervisor: Arc<Supervisor>,
        fold: Arc<Fold>,
        replay: Option<Arc<Replay>>,
        commands: Receiver<Command>,
        deps: SourceDeps,
        cache_bytes: usize,
    ) -> Result<Folding, LoopError> {
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
        let facts = Facts::new(supervisor.dedup.as_ref(), supervisor.event_time.as_deref())
            .map_err(|e| LoopError::Config(e.to_string()))?;
        let dedup = supervisor.dedup.as_ref().map(Dedup::new);
        Ok(Folding {
            max_events: deps.store_config.batch_max_events as u64,
            max_wait: Duration::from_millis(deps.store_config.batch_max_wait_ms),
            supervisor,
            fold,
            replay,
            throttle,
            deps,
            positions: HashMap::new(),
            batch: Batch::new(cache_bytes),
            unapplied_noted: HashSet::new(),
            commands,
            stopping: false,
            log_behind: None,
            facts,
            dedup,
            dead_letters,
        })
    }

    /// The command channel, for the loop that folds this fold next.
    pub(super) fn into_commands(self) -> Receiver<Command> {
        self.commands
    }

    /// Takes in what the supervisor and the lag monitor said since last time.
    pub(super) fn read_commands(&mut self) {
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Stop => self.stopping = true,
                Command::LogBehind(found) => self.log_behind = Some(found),
            }
        }
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
        let stored = self.deps.store.next_offset(&self.fold.generation, partition)?;
        self.batch.note_stored_offset(partition, stored);
        let next = stored.unwrap_or(0);
        self.positions.insert(partition.clone(), next);
        Ok(next)
    }

    /// True when the open batch is due for a commit: by its events, and with
    /// `check_clock` also by its age.
    pub(super) fn is_due(&self, check_clock: bool) -> bool {
        self.batch
            .is_due(self.max_events, check_clock.then_some(self.max_wait))
    }

    /// Forgets what it knows of a partition its loop no longer folds.
    pub(super) fn forget_partition(&mut self, partition: &SourcePartition) {
        self.positions.remove(partition);
        self.batch.drop_partition(partition);
        if let Some(dedup) = self.dedup.as_mut() {
            dedup.drop_partition(partition);
        }
    }
}
