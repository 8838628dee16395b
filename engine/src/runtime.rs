//! What the worker knows about each running projection, shared by its fold loop and
//! the HTTP API.

use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::poison::PoisonReason;
use crate::projection::Projection;
use crate::store::Generation;

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
    generation: Mutex<Arc<Generation>>,
    state: Mutex<RunState>,
}

impl ProjectionRuntime {
    /// A projection that has not started consuming yet.
    pub fn new(
        name: String,
        kind: String,
        topics: Vec<String>,
        projection: Arc<dyn Projection>,
        generation: Generation,
    ) -> Self {
        ProjectionRuntime {
            name,
            kind,
            topics,
            projection,
            generation: Mutex::new(Arc::new(generation)),
            state: Mutex::new(RunState::Starting),
        }
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
        *self.state.lock().expect("state lock") = state;
    }
}
