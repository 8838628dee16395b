//! What the worker knows about each running projection, shared by its fold loop and
//! the HTTP API.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use serde::Serialize;

use crate::config::{PoisonPolicy, ProjectionConfig};
use crate::poison::PoisonReason;
use crate::projection::Projection;
use crate::store::{Generation, SourcePartition};

/// Where a projection's fold loop is.
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
    /// Stopped on shutdown.
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

/// One projection of this worker.
pub struct ProjectionRuntime {
    /// Configured name.
    pub name: String,
    /// Kind (built-in name).
    pub kind: String,
    /// Source topics.
    pub topics: Vec<String>,
    /// The fold.
    pub projection: Arc<dyn Projection>,
    /// What happens to poison events.
    pub on_poison: PoisonPolicy,
    /// Where dead letters go.
    pub dead_letter_topic: Option<String>,
    /// Larger values are poison.
    pub max_event_bytes: usize,
    generation: Mutex<Arc<Generation>>,
    state: Mutex<RunState>,
    skip_once: Mutex<Option<Position>>,
    respawn: OnceLock<Box<dyn Fn() + Send + Sync>>,
    /// Record timestamp of the oldest polled-but-uncommitted event per partition.
    unapplied: Mutex<HashMap<SourcePartition, i64>>,
    assigned: AtomicBool,
}

impl ProjectionRuntime {
    /// A projection that has not started consuming yet.
    pub fn new(config: &ProjectionConfig, projection: Arc<dyn Projection>, generation: Generation) -> Self {
        ProjectionRuntime {
            name: config.name.clone(),
            kind: config.kind.clone().unwrap_or_else(|| "declarative".to_owned()),
            topics: config.topics.clone(),
            projection,
            on_poison: config.on_poison,
            dead_letter_topic: config.dead_letter_topic.clone(),
            max_event_bytes: config.max_event_bytes,
            generation: Mutex::new(Arc::new(generation)),
            state: Mutex::new(RunState::Starting),
            skip_once: Mutex::new(None),
            respawn: OnceLock::new(),
            unapplied: Mutex::new(HashMap::new()),
            assigned: AtomicBool::new(false),
        }
    }

    /// Sets how to start the fold loop again (once, by the worker).
    pub fn set_respawn(&self, respawn: Box<dyn Fn() + Send + Sync>) {
        let _ = self.respawn.set(respawn);
    }

    /// Starts the fold loop again after it stopped on a poison event or a failure;
    /// false when it is not stopped.
    pub fn resume(&self) -> bool {
        {
            let mut state = self.state.lock().expect("state lock");
            if !matches!(*state, RunState::Poisoned { .. } | RunState::Failed { .. }) {
                return false;
            }
            *state = RunState::Starting;
        }
        if let Some(respawn) = self.respawn.get() {
            respawn();
        }
        true
    }

    /// Resumes past exactly the event the projection stopped at; that event's
    /// position, or `None` when the projection is not stopped on a poison event.
    pub fn skip_poison(&self) -> Option<Position> {
        let position = match self.state() {
            RunState::Poisoned {
                topic,
                partition,
                offset,
                ..
            } => Position {
                topic,
                partition,
                offset,
            },
            _ => return None,
        };
        *self.skip_once.lock().expect("skip lock") = Some(position.clone());
        self.resume().then_some(position)
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

    /// The generation reads and folds go to.
    pub fn generation(&self) -> Arc<Generation> {
        self.generation.lock().expect("generation lock").clone()
    }

    /// Where the fold loop is.
    pub fn state(&self) -> RunState {
        self.state.lock().expect("state lock").clone()
    }

    /// Records where the fold loop is.
    pub fn set_state(&self, state: RunState) {
        let up = matches!(state, RunState::Running);
        if !up {
            self.assigned.store(false, Ordering::Relaxed);
        }
        crate::metrics::PROJECTION_UP
            .with_label_values(&[&self.name])
            .set(i64::from(up));
        *self.state.lock().expect("state lock") = state;
    }

    /// Records that the group assigned partitions (and the loop positioned them at
    /// the stored offsets).
    pub fn set_assigned(&self) {
        self.assigned.store(true, Ordering::Relaxed);
    }

    /// `None` when the projection is ready to serve: running, partitions assigned
    /// and positioned; otherwise why not.
    pub fn not_ready(&self) -> Option<String> {
        match self.state() {
            RunState::Running if self.assigned.load(Ordering::Relaxed) => None,
            RunState::Running => Some(format!("{}: waiting for its partition assignment", self.name)),
            other => Some(format!(
                "{}: {}",
                self.name,
                serde_json::to_string(&other).unwrap_or_default()
            )),
        }
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
