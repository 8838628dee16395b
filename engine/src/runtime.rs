//! What the worker knows about each projection and each of its fold loops, shared
//! by the loops and the HTTP API.
//!
//! A projection has one live generation, whose fold loop serves reads, and at most
//! one replay building the next generation beside it (see [`crate::replay`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use serde::Serialize;
use serde_json::Value as Json;

use crate::config::{PoisonPolicy, ProjectionConfig};
use crate::poison::PoisonReason;
use crate::projection::Projection;
use crate::replay::{Replay, ReplayOutcome};
use crate::store::{Generation, SourcePartition};

/// Where a fold loop is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RunState {
    /// Created, not consuming yet.
    Starting,
    /// Consuming and folding.
    Running,
    /// Halted at an event it could not apply (poison policy `stop`).
    Poisoned {
        /// Topic of the event.
        topic: String,
        /// Partition of the event.
        partition: i32,
        /// Offset of the event; nothing at or after it in that partition was applied.
        offset: i64,
        /// Why.
        reason: PoisonReason,
        /// The detailed error.
        error: String,
    },
    /// The loop ended on an infrastructure error (storage, assignment).
    Failed {
        /// The error.
        error: String,
    },
    /// The store refuses writes (disk full, I/O error): the open batch is kept and
    /// retried with backoff; no offset moves until it is written.
    StoreUnavailable {
        /// The store's error.
        error: String,
    },
    /// Stopped on shutdown, or handed over to a replayed generation.
    Stopped,
}

/// A position in a source partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Position {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

/// One generation of a projection and its fold loop: what it folds with and
/// where the loop is.
pub struct Fold {
    /// The generation it writes.
    pub generation: Generation,
    /// The fold, built from the generation's recorded definition.
    pub projection: Arc<dyn Projection>,
    /// Source topics of that definition.
    pub topics: Vec<String>,
    state: Mutex<RunState>,
    skip_once: Mutex<Option<Position>>,
    /// Record timestamp of the oldest polled-but-uncommitted event per partition.
    unapplied: Mutex<HashMap<SourcePartition, i64>>,
    assigned: AtomicBool,
    live: AtomicBool,
    stop_requested: AtomicBool,
    loop_running: AtomicBool,
    committed_events: AtomicU64,
    /// A partition the lag monitor found shorter than its stored offset.
    log_behind: Mutex<Option<LogBehind>>,
}

/// A partition whose log ends before the stored next offset (found by the lag
/// monitor on brokers that answer such a fetch with no records and no error).
#[derive(Debug, Clone)]
pub struct LogBehind {
    /// The partition.
    pub partition: SourcePartition,
    /// The stored next offset.
    pub next: i64,
    /// Its log's watermarks when found.
    pub low: i64,
    /// High watermark.
    pub high: i64,
}

impl Fold {
    /// A fold that has not started consuming yet.
    pub fn new(
        generation: Generation,
        projection: Arc<dyn Projection>,
        topics: Vec<String>,
        live: bool,
    ) -> Self {
        Fold {
            generation,
            projection,
            topics,
            state: Mutex::new(RunState::Starting),
            skip_once: Mutex::new(None),
            unapplied: Mutex::new(HashMap::new()),
            assigned: AtomicBool::new(false),
            live: AtomicBool::new(live),
            stop_requested: AtomicBool::new(false),
            loop_running: AtomicBool::new(false),
            committed_events: AtomicU64::new(0),
            log_behind: Mutex::new(None),
        }
    }

    /// The projection's name.
    pub fn name(&self) -> &str {
        &self.generation.projection
    }

    /// True when this generation serves reads.
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::SeqCst)
    }

    /// Marks this generation as the one serving reads (after a switch).
    pub(crate) fn set_live(&self) {
        self.live.store(true, Ordering::SeqCst);
        self.publish_up();
    }

    /// Asks the fold loop to commit its batch and stop.
    pub(crate) fn request_stop(&self) {
        self.stop_requested.store(true, Ordering::SeqCst);
    }

    /// Withdraws a stop request (a handover that did not happen).
    pub(crate) fn cancel_stop(&self) {
        self.stop_requested.store(false, Ordering::SeqCst);
    }

    /// True once a stop was requested.
    pub fn stop_requested(&self) -> bool {
        self.stop_requested.load(Ordering::SeqCst)
    }

    /// Records whether a thread runs this fold's loop.
    pub(crate) fn set_loop_running(&self, running: bool) {
        self.loop_running.store(running, Ordering::SeqCst);
    }

    /// True while a thread runs this fold's loop.
    pub fn loop_running(&self) -> bool {
        self.loop_running.load(Ordering::SeqCst)
    }

    /// Counts events committed by this fold's loop.
    pub(crate) fn count_committed(&self, events: u64) {
        self.committed_events.fetch_add(events, Ordering::Relaxed);
    }

    /// Events this fold's loops committed since the worker started (updated per
    /// batch; a restarted worker counts from 0).
    pub fn committed_events(&self) -> u64 {
        self.committed_events.load(Ordering::Relaxed)
    }

    /// Where the fold loop is.
    pub fn state(&self) -> RunState {
        self.state.lock().expect("state lock").clone()
    }

    /// Records where the fold loop is.
    pub fn set_state(&self, state: RunState) {
        if !matches!(state, RunState::Running) {
            self.assigned.store(false, Ordering::Relaxed);
        }
        *self.state.lock().expect("state lock") = state;
        self.publish_up();
    }

    fn publish_up(&self) {
        if self.is_live() {
            let up = matches!(self.state(), RunState::Running);
            crate::metrics::PROJECTION_UP
                .with_label_values(&[self.name()])
                .set(i64::from(up));
        }
    }

    /// Records that the group assigned partitions (and the loop positioned them at
    /// the stored offsets).
    pub fn set_assigned(&self) {
        self.assigned.store(true, Ordering::Relaxed);
    }

    /// True when the loop runs with its partitions assigned and positioned.
    pub fn is_assigned(&self) -> bool {
        self.assigned.load(Ordering::Relaxed)
    }

    /// Marks the fold to start again after a poison event or a failure; false when
    /// it is not stopped that way, or is being stopped for good.
    fn mark_resumed(&self) -> bool {
        let mut state = self.state.lock().expect("state lock");
        if self.stop_requested() || !matches!(*state, RunState::Poisoned { .. } | RunState::Failed { .. }) {
            return false;
        }
        *state = RunState::Starting;
        *self.log_behind.lock().expect("log_behind lock") = None;
        true
    }

    /// Tells the fold loop that a partition's log ends before its stored offset.
    pub fn report_log_behind(&self, found: LogBehind) {
        *self.log_behind.lock().expect("log_behind lock") = Some(found);
    }

    /// What [`Fold::report_log_behind`] reported, once.
    pub fn take_log_behind(&self) -> Option<LogBehind> {
        self.log_behind.lock().expect("log_behind lock").take()
    }

    /// True (once) when the operator asked to skip the event at this position.
    pub fn take_skip(&self, topic: &str, partition: i32, offset: i64) -> bool {
        let mut skip = self.skip_once.lock().expect("skip lock");
        let matches = skip
            .as_ref()
            .is_some_and(|p| p.topic == topic && p.partition == partition && p.offset == offset);
        if matches {
            *skip = None;
        }
        matches
    }

    /// Notes the record timestamp of an event polled but not yet committed, unless
    /// an older one of that partition is already noted.
    pub fn note_unapplied(&self, partition: &SourcePartition, timestamp_ms: i64) {
        self.unapplied
            .lock()
            .expect("unapplied lock")
            .entry(partition.clone())
            .or_insert(timestamp_ms);
    }

    /// Forgets the noted timestamps of partitions whose events were committed.
    pub fn clear_unapplied<'a>(&self, partitions: impl Iterator<Item = &'a SourcePartition>) {
        let mut unapplied = self.unapplied.lock().expect("unapplied lock");
        for partition in partitions {
            unapplied.remove(partition);
        }
    }

    /// The oldest noted unapplied event's timestamp in `partition`.
    pub fn oldest_unapplied(&self, partition: &SourcePartition) -> Option<i64> {
        self.unapplied
            .lock()
            .expect("unapplied lock")
            .get(partition)
            .copied()
    }
}

/// Starts a thread running a fold's loop (set once by the worker).
pub type Spawner = Box<dyn Fn(Arc<Fold>) + Send + Sync>;

/// One configured projection of this worker.
pub struct ProjectionRuntime {
    /// Configured name.
    pub name: String,
    /// Kind (built-in name, or `declarative`).
    pub kind: String,
    /// What happens to poison events.
    pub on_poison: PoisonPolicy,
    /// Where dead letters go.
    pub dead_letter_topic: Option<String>,
    /// Larger values are poison.
    pub max_event_bytes: usize,
    /// The definition in the config, which a replay folds with.
    pub configured_definition: Json,
    /// The fold built from the configured definition.
    pub configured_projection: Arc<dyn Projection>,
    live: Mutex<Arc<Fold>>,
    replay: Mutex<Option<Arc<Replay>>>,
    last_replay: Mutex<Option<ReplayOutcome>>,
    spawner: OnceLock<Spawner>,
}

impl ProjectionRuntime {
    /// A projection whose live generation is `live` (not started yet).
    pub fn new(config: &ProjectionConfig, configured_projection: Arc<dyn Projection>, live: Fold) -> Self {
        ProjectionRuntime {
            name: config.name.clone(),
            kind: config.kind.clone().unwrap_or_else(|| "declarative".to_owned()),
            on_poison: config.on_poison,
            dead_letter_topic: config.dead_letter_topic.clone(),
            max_event_bytes: config.max_event_bytes,
            configured_definition: config.definition(),
            configured_projection,
            live: Mutex::new(Arc::new(live)),
            replay: Mutex::new(None),
            last_replay: Mutex::new(None),
            spawner: OnceLock::new(),
        }
    }

    /// Sets how to start a fold loop (once, by the worker).
    pub fn set_spawner(&self, spawner: Spawner) {
        let _ = self.spawner.set(spawner);
    }

    /// Starts a thread running `fold`'s loop.
    pub fn spawn(&self, fold: Arc<Fold>) {
        if let Some(spawner) = self.spawner.get() {
            fold.set_loop_running(true);
            spawner(fold);
        }
    }

    /// The live generation's fold: reads and lag go to it.
    pub fn live(&self) -> Arc<Fold> {
        self.live.lock().expect("live lock").clone()
    }

    /// The running replay, if any.
    pub fn replay(&self) -> Option<Arc<Replay>> {
        self.replay.lock().expect("replay lock").clone()
    }

    /// The slot of the running replay, for starting one under its lock.
    pub(crate) fn replay_slot(&self) -> std::sync::MutexGuard<'_, Option<Arc<Replay>>> {
        self.replay.lock().expect("replay lock")
    }

    /// How the last replay ended, if one ended since the worker started.
    pub fn last_replay(&self) -> Option<ReplayOutcome> {
        self.last_replay.lock().expect("last replay lock").clone()
    }

    /// Makes the replay's fold live (the store already switched) and forgets the
    /// replay; returns the fold that was live.
    pub(crate) fn promote(&self, replay: &Replay, outcome: ReplayOutcome) -> Arc<Fold> {
        let previous = std::mem::replace(&mut *self.live.lock().expect("live lock"), replay.fold.clone());
        replay.fold.set_live();
        *self.replay.lock().expect("replay lock") = None;
        *self.last_replay.lock().expect("last replay lock") = Some(outcome);
        previous
    }

    /// Forgets a replay that ended without a switch.
    pub(crate) fn forget_replay(&self, outcome: ReplayOutcome) {
        *self.replay.lock().expect("replay lock") = None;
        *self.last_replay.lock().expect("last replay lock") = Some(outcome);
    }

    /// The fold an operator's resume or skip applies to: the live one when it is
    /// stopped, else a stopped replay.
    fn stopped_fold(&self) -> Option<Arc<Fold>> {
        let stopped =
            |fold: &Fold| matches!(fold.state(), RunState::Poisoned { .. } | RunState::Failed { .. });
        let live = self.live();
        if stopped(&live) {
            return Some(live);
        }
        self.replay().map(|r| r.fold.clone()).filter(|f| stopped(f))
    }

    /// Starts a fold loop again after it stopped on a poison event or a failure
    /// (the live one first, else the replay's); the generation resumed, or `None`
    /// when none is stopped.
    pub fn resume(&self) -> Option<u64> {
        let fold = self.stopped_fold()?;
        if !fold.mark_resumed() {
            return None;
        }
        self.spawn(fold.clone());
        Some(fold.generation.number)
    }

    /// Resumes past exactly the event a fold loop stopped at (the live one first,
    /// else the replay's); that generation and position, or `None` when none is
    /// stopped on a poison event.
    pub fn skip_poison(&self) -> Option<(u64, Position)> {
        let fold = self.stopped_fold()?;
        let RunState::Poisoned {
            topic,
            partition,
            offset,
            ..
        } = fold.state()
        else {
            return None;
        };
        let position = Position {
            topic,
            partition,
            offset,
        };
        *fold.skip_once.lock().expect("skip lock") = Some(position.clone());
        if !fold.mark_resumed() {
            return None;
        }
        self.spawn(fold.clone());
        Some((fold.generation.number, position))
    }

    /// `None` when the projection is ready to serve: its live fold runs with its
    /// partitions assigned and positioned; otherwise why not.
    pub fn not_ready(&self) -> Option<String> {
        let live = self.live();
        match live.state() {
            RunState::Running if live.is_assigned() => None,
            RunState::Running => Some(format!("{}: waiting for its partition assignment", self.name)),
            // A live generation handing over to a replay is about to be replaced.
            RunState::Stopped if self.replay().is_some() => None,
            other => Some(format!(
                "{}: {}",
                self.name,
                serde_json::to_string(&other).unwrap_or_default()
            )),
        }
    }
}
