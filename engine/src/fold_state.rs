//! What the worker knows about one fold loop: the generation it folds, where it
//! is ([`RunState`]), the partitions it owns, and what the HTTP API and the lag
//! monitor have asked of it (stop, skip, a log found behind its offsets).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::as_of::AsOfSpec;
use crate::poison::PoisonReason;
use crate::projection::Projection;
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
    /// For an as-of generation: the time it folds up to and where it stops.
    pub as_of: Option<AsOfSpec>,
    state: Mutex<RunState>,
    skip_once: Mutex<Option<Position>>,
    /// Record timestamp of the oldest polled-but-uncommitted event per partition.
    unapplied: Mutex<HashMap<SourcePartition, i64>>,
    assigned: AtomicBool,
    live: AtomicBool,
    loop_running: AtomicBool,
    /// Folded by its topics' shared source (not a loop of its own).
    shared: AtomicBool,
    committed_events: AtomicU64,
    /// The command channel of the running loop.
    commands: Mutex<Commands>,
    /// The event whose fold panicked, and the panic: the loop that folds it
    /// again treats it as poison instead of folding it.
    known_panic: Mutex<Option<(SourcePartition, i64, String)>>,
    /// The partitions the group assigned to this fold's loop (kept when the loop
    /// stops, so a stopped projection's lag keeps being reported).
    owned: Mutex<BTreeSet<SourcePartition>>,
    /// The partitions the loop has assigned right now (unlike `owned`, dropped on
    /// a revocation and when the loop exits or starts over; a loop that ends to
    /// join a shared source leaves them to the source, which replaces them),
    /// each with the number of its gain and how far it must fold before a
    /// worker of a cluster serves it.
    serving: Mutex<BTreeMap<SourcePartition, (u64, Restore)>>,
}

/// Numbers each gain of a partition, so a restore measured for an earlier gain
/// is never applied to a later one (see [`Fold::set_restore`]).
static GAINS: AtomicU64 = AtomicU64::new(0);

/// How far a partition a worker gained has come (multi-worker mode): its reads
/// are served only once it has folded up to the high watermark seen after the
/// gain, so no reader sees a value older than the previous owner served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "until")]
pub enum Restore {
    /// Gained; the high watermark to reach is not known yet.
    Unknown,
    /// Restoring up to this next offset (the high watermark seen after the gain).
    Until(i64),
    /// Restored: served.
    Done,
}

/// What a supervisor or the lag monitor tells a running fold loop.
#[derive(Debug)]
pub enum Command {
    /// Commit the open batch and stop (a handover, an abort).
    Stop,
    /// This partition's log ends before its stored next offset: stop with reason
    /// `offsets_reset` if the loop still folds it at that offset.
    LogBehind(LogBehind),
}

/// A fold's command channel.
#[derive(Default)]
struct Commands {
    sender: Option<Sender<Command>>,
    /// The receiving end between two loops of one run (see [`Fold::hand_on`]).
    waiting: Option<Receiver<Command>>,
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
            as_of: None,
            state: Mutex::new(RunState::Starting),
            skip_once: Mutex::new(None),
            unapplied: Mutex::new(HashMap::new()),
            assigned: AtomicBool::new(false),
            live: AtomicBool::new(live),
            loop_running: AtomicBool::new(false),
            shared: AtomicBool::new(false),
            committed_events: AtomicU64::new(0),
            commands: Mutex::new(Commands::default()),
            known_panic: Mutex::new(None),
            owned: Mutex::new(BTreeSet::new()),
            serving: Mutex::new(BTreeMap::new()),
        }
    }

    /// This fold as an as-of generation folding up to `spec`.
    pub fn with_as_of(mut self, spec: AsOfSpec) -> Self {
        self.as_of = Some(spec);
        self
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

    /// The receiving end of this generation's command channel, for a loop that
    /// starts folding it (opening the channel when none is open).
    pub(crate) fn listen(&self) -> Receiver<Command> {
        let mut commands = self.commands.lock().expect("commands lock");
        if commands.sender.is_some() {
            if let Some(receiver) = commands.waiting.take() {
                return receiver;
            }
        }
        let (sender, receiver) = channel();
        commands.sender = Some(sender);
        receiver
    }

    /// Keeps the channel open for the loop that starts next (a loop that
    /// starts over after a panic): commands sent meanwhile wait for it.
    pub(crate) fn hand_on(&self, receiver: Receiver<Command>) {
        self.commands.lock().expect("commands lock").waiting = Some(receiver);
    }

    /// Closes the command channel (the loop has ended).
    pub(crate) fn stop_listening(&self) {
        *self.commands.lock().expect("commands lock") = Commands::default();
    }

    /// Sends `command` to the running loop; false when no loop listens.
    pub(crate) fn tell(&self, command: Command) -> bool {
        self.commands
            .lock()
            .expect("commands lock")
            .sender
            .as_ref()
            .is_some_and(|sender| sender.send(command).is_ok())
    }

    /// Records whether a thread runs this fold's loop.
    pub(crate) fn set_loop_running(&self, running: bool) {
        self.loop_running.store(running, Ordering::SeqCst);
    }

    /// Records whether the fold is folded by its topics' shared source.
    pub(crate) fn set_shared(&self, shared: bool) {
        self.shared.store(shared, Ordering::SeqCst);
    }

    /// True while the fold is folded by its topics' shared source.
    pub fn is_shared(&self) -> bool {
        self.shared.load(Ordering::SeqCst)
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

    /// Marks the fold to start again after a poison event or a failure.
    pub(crate) fn mark_resumed(&self) {
        *self.state.lock().expect("state lock") = RunState::Starting;
    }

    /// Records partitions the group assigned to this fold's loop.
    pub(crate) fn own(&self, partitions: impl IntoIterator<Item = SourcePartition>) {
        self.owned.lock().expect("owned lock").extend(partitions);
    }

    /// Records partitions the group took away from this fold's loop.
    pub(crate) fn disown<'a>(&self, partitions: impl IntoIterator<Item = &'a SourcePartition>) {
        let mut owned = self.owned.lock().expect("owned lock");
        for partition in partitions {
            owned.remove(partition);
        }
    }

    /// Records partitions the loop was assigned (anew: what was known of an
    /// earlier assignment no longer holds): restoring until they reach the high
    /// watermark (see [`Restore`]).
    pub(crate) fn start_serving(&self, partitions: impl IntoIterator<Item = SourcePartition>) {
        let mut serving = self.serving.lock().expect("serving lock");
        for partition in partitions {
            let gain = GAINS.fetch_add(1, Ordering::Relaxed);
            serving.insert(partition, (gain, Restore::Unknown));
        }
    }

    /// Records partitions the loop no longer has.
    pub(crate) fn stop_serving<'a>(&self, partitions: impl IntoIterator<Item = &'a SourcePartition>) {
        let mut serving = self.serving.lock().expect("serving lock");
        for partition in partitions {
            serving.remove(partition);
        }
    }

    /// Forgets every partition: the loop exited.
    pub(crate) fn stop_serving_all(&self) {
        self.serving.lock().expect("serving lock").clear();
    }

    /// The partitions assigned to the loop now, each with the number of its gain
    /// and how far it has come.
    pub fn serving(&self) -> BTreeMap<SourcePartition, (u64, Restore)> {
        self.serving.lock().expect("serving lock").clone()
    }

    /// How far `partition` has come, if it is assigned.
    pub fn restore_of(&self, partition: &SourcePartition) -> Option<Restore> {
        self.serving
            .lock()
            .expect("serving lock")
            .get(partition)
            .map(|(_, restore)| *restore)
    }

    /// Moves a partition on, only while it is still assigned by the same gain
    /// (`gain` from [`Fold::serving`]): a revocation and a new assignment in
    /// between start it over.
    pub fn set_restore(&self, partition: &SourcePartition, gain: u64, restore: Restore) {
        if let Some(entry) = self.serving.lock().expect("serving lock").get_mut(partition) {
            if entry.0 == gain {
                entry.1 = restore;
            }
        }
    }

    /// Whether the loop's state lets its restored partitions be served: folding,
    /// or waiting for the store (what it committed stays right).
    pub fn serves(&self) -> bool {
        matches!(
            self.state(),
            RunState::Running | RunState::StoreUnavailable { .. }
        )
    }

    /// The partitions this worker folds for this generation: lag is reported for
    /// these only.
    pub fn owned_partitions(&self) -> BTreeSet<SourcePartition> {
        self.owned.lock().expect("owned lock").clone()
    }

    /// Remembers that folding the event at `offset` of `partition` panicked.
    pub(crate) fn remember_panic(&self, partition: &SourcePartition, offset: i64, panic: String) {
        *self.known_panic.lock().expect("panic lock") = Some((partition.clone(), offset, panic));
    }

    /// The panic of the event at this position, once, if its fold panicked.
    pub(crate) fn take_known_panic(&self, partition: &SourcePartition, offset: i64) -> Option<String> {
        let mut known = self.known_panic.lock().expect("panic lock");
        if known
            .as_ref()
            .is_some_and(|(p, o, _)| p == partition && *o == offset)
        {
            return known.take().map(|(_, _, panic)| panic);
        }
        None
    }

    /// Asks the next loop to skip the event at `position` without folding it.
    pub(crate) fn set_skip(&self, position: Position) {
        *self.skip_once.lock().expect("skip lock") = Some(position);
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
