//! One supervisor per projection: it owns the projection's lifecycle, starts its
//! fold loops, tells them what to do and hears how they end.
//!
//! The lifecycle ([`Lifecycle`]) and its transitions, each made under one lock by
//! the method named:
//!
//! ```text
//!  Live ──start_replay──▶ Replaying ──replay_caught_up──▶ HandingOver{target: None}
//!   ▲                        ▲    │                            │ live loop exits
//!   │                        │    │ abort_replay,              ▼ (loop_exited)
//!   │          replay loop   │    │ replay loop exits    HandingOver{target: Some}
//!   │          exits before  │    │ while aborting             │ replay loop folded up
//!   │          the switch ───┘    ▼                            │ to target (switch)
//!   └──────────────────────── Live ◀───────────────────────────┘
//!                        (live unchanged)       (the replay's generation is live)
//! ```
//!
//! - `Live`: the live generation folds and serves reads; no replay runs.
//! - `Replaying`: a replay folds the next generation from offset 0 in its own loop
//!   beside the live one, which keeps folding and serving.
//! - `HandingOver`: the replay caught up (the lag monitor says so); the live loop
//!   was told to stop. Once it has exited, its stored offsets are final and become
//!   the `target`; the replay loop folds up to them, commits, and calls
//!   [`Supervisor::switch`]: one store write makes the replay's generation live.
//!   If the replay loop exits before that (poison, failure), the live loop is
//!   started again and the replay goes back to `Replaying`.
//!
//! Each generation's loop has a state of its own ([`RunState`]): starting,
//! running, store unavailable, poisoned at a position, failed with its error,
//! stopped. [`Supervisor::resume`] and [`Supervisor::skip_poison`] start a
//! poisoned or failed loop again. A loop learns what to do only from commands on
//! its own channel ([`crate::fold_state::Command`]) and reports how it ended with
//! [`Supervisor::loop_exited`].

mod as_of;
mod cluster_replay;
mod handover;

pub use as_of::AsOfError;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value as Json;
use tracing::{error, info, warn};

use crate::config::{PoisonPolicy, ProjectionConfig};
use crate::fold_state::{Fold, Position, RunState};
use crate::projection::Projection;
use crate::replay::{Phase, Replay, ReplayOutcome};
use crate::store::{SourcePartition, Store, StoreError};

/// Starts a thread running a fold's loop (set once by the worker).
pub type Spawner = Box<dyn Fn(Arc<Fold>) + Send + Sync>;

/// Where a projection is in its lifecycle (see the module documentation).
#[derive(Clone)]
pub enum Lifecycle {
    /// The live generation folds and serves; no replay runs.
    Live {
        /// The live generation.
        live: Arc<Fold>,
    },
    /// A replay builds the next generation beside the live one.
    Replaying {
        /// The live generation.
        live: Arc<Fold>,
        /// The replay.
        replay: Arc<Replay>,
    },
    /// The replay caught up: the live loop stops, the replay folds up to the live
    /// generation's final offsets and switches.
    HandingOver {
        /// The live generation, being stopped.
        live: Arc<Fold>,
        /// The replay.
        replay: Arc<Replay>,
        /// The live generation's final offsets, once its loop has exited.
        target: Option<BTreeMap<SourcePartition, i64>>,
    },
}

impl Lifecycle {
    fn live(&self) -> &Arc<Fold> {
        match self {
            Lifecycle::Live { live }
            | Lifecycle::Replaying { live, .. }
            | Lifecycle::HandingOver { live, .. } => live,
        }
    }

    fn replay(&self) -> Option<&Arc<Replay>> {
        match self {
            Lifecycle::Live { .. } => None,
            Lifecycle::Replaying { replay, .. } | Lifecycle::HandingOver { replay, .. } => Some(replay),
        }
    }
}

/// Why a replay could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// One is running already; its status.
    #[error("a replay of this projection is running already")]
    Running(serde_json::Value),
    /// The store could not create the generation.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The supervisor of one configured projection.
pub struct Supervisor {
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
    /// Fold each event id once, when set.
    pub dedup: Option<crate::config::DedupConfig>,
    /// Where an event's time is, for as-of generations (record timestamp when absent).
    pub event_time: Option<String>,
    /// State keys are the records' message keys (see
    /// [`ProjectionConfig::keyed_like_topic`]).
    pub keyed_like_topic: bool,
    /// The definition in the config, which a replay folds with.
    pub configured_definition: Json,
    /// The fold built from the configured definition.
    pub configured_projection: Arc<dyn Projection>,
    lifecycle: Mutex<Lifecycle>,
    /// As-of generations by the time they fold up to.
    as_ofs: Mutex<BTreeMap<i64, Arc<Fold>>>,
    last_replay: Mutex<Option<ReplayOutcome>>,
    spawner: OnceLock<Spawner>,
    /// In multi-worker mode replays are moved on by the cluster topic's replay
    /// record, not by this worker's lag monitor ([`cluster_replay`]).
    clustered: AtomicBool,
}

impl Supervisor {
    /// A projection whose live generation is `live`, and the replay found in the
    /// store when there is one (neither started yet).
    pub fn new(
        config: &ProjectionConfig,
        configured_projection: Arc<dyn Projection>,
        live: Fold,
        replay: Option<Fold>,
    ) -> Self {
        let live = Arc::new(live);
        let lifecycle = match replay {
            Some(fold) => Lifecycle::Replaying {
                live,
                replay: Arc::new(Replay::new(Arc::new(fold))),
            },
            None => Lifecycle::Live { live },
        };
        Supervisor {
            name: config.name.clone(),
            kind: config.kind.clone().unwrap_or_else(|| "declarative".to_owned()),
            on_poison: config.on_poison,
            dead_letter_topic: config.dead_letter_topic.clone(),
            max_event_bytes: config.max_event_bytes,
            dedup: config.dedup.clone(),
            event_time: config.event_time.clone(),
            keyed_like_topic: config.keyed_like_topic,
            configured_definition: config.definition(),
            configured_projection,
            lifecycle: Mutex::new(lifecycle),
            as_ofs: Mutex::new(BTreeMap::new()),
            last_replay: Mutex::new(None),
            spawner: OnceLock::new(),
            clustered: AtomicBool::new(false),
        }
    }

    fn lifecycle(&self) -> MutexGuard<'_, Lifecycle> {
        self.lifecycle.lock().expect("lifecycle lock")
    }

    /// Multi-worker mode: replays follow the cluster topic (set once, by the
    /// worker, before the loops start).
    pub fn set_clustered(&self) {
        self.clustered.store(true, Ordering::SeqCst);
    }

    /// True in multi-worker mode.
    pub fn is_clustered(&self) -> bool {
        self.clustered.load(Ordering::SeqCst)
    }

    /// Sets how to start a fold loop (once, by the worker).
    pub fn set_spawner(&self, spawner: Spawner) {
        let _ = self.spawner.set(spawner);
    }

    /// Starts the loops of the live generation, of a replay found in the store and
    /// of as-of generations not complete yet.
    pub fn start(&self) {
        let lifecycle = self.lifecycle().clone();
        self.spawn(lifecycle.live().clone());
        if let Some(replay) = lifecycle.replay() {
            info!(projection = %self.name, generation = replay.fold.generation.number, "resuming the replay");
            self.spawn(replay.fold.clone());
        }
        self.start_as_ofs();
    }

    /// [`Supervisor::start`] but for the live generation, which the worker
    /// starts in its topics' shared source.
    pub fn start_all_but_live(&self) {
        if let Some(replay) = self.replay() {
            info!(projection = %self.name, generation = replay.fold.generation.number, "resuming the replay");
            self.spawn(replay.fold.clone());
        }
        self.start_as_ofs();
    }

    /// Starts a thread running `fold`'s loop.
    pub(crate) fn spawn(&self, fold: Arc<Fold>) {
        if let Some(spawner) = self.spawner.get() {
            fold.set_loop_running(true);
            spawner(fold);
        }
    }

    /// Where the projection is in its lifecycle.
    pub fn state(&self) -> Lifecycle {
        self.lifecycle().clone()
    }

    /// The live generation's fold: reads and lag go to it.
    pub fn live(&self) -> Arc<Fold> {
        self.lifecycle().live().clone()
    }

    /// The running replay, if any.
    pub fn replay(&self) -> Option<Arc<Replay>> {
        self.lifecycle().replay().cloned()
    }

    /// The running replay's status, as the API shows it.
    pub fn replay_status(&self) -> Option<Json> {
        let lifecycle = self.lifecycle();
        let phase = match &*lifecycle {
            Lifecycle::Live { .. } => return None,
            Lifecycle::Replaying { .. } => Phase::Replaying,
            Lifecycle::HandingOver { .. } => Phase::HandingOver,
        };
        lifecycle.replay().map(|r| r.status(phase))
    }

    /// How the last replay ended, if one ended since the worker started.
    pub fn last_replay(&self) -> Option<ReplayOutcome> {
        self.last_replay.lock().expect("last replay lock").clone()
    }

    /// A fold loop's thread ends. The live loop of a handover makes the target
    /// final; a replay's loop that did not switch hands the projection back to
    /// its live generation (and an aborted replay is dropped). At shutdown
    /// nothing changes: the next start resumes from what the store says.
    pub(crate) fn loop_exited(&self, fold: &Arc<Fold>, store: &Store, shutting_down: bool) {
        fold.stop_listening();
        fold.stop_serving_all();
        {
            let mut lifecycle = self.lifecycle();
            fold.set_loop_running(false);
            if shutting_down {
                return;
            }
            if fold.as_of.is_some() {
                drop(lifecycle);
                self.as_of_loop_exited(fold, store);
                return;
            }
            if matches!(fold.state(), RunState::Starting) {
                // Resumed by the operator while it was still exiting.
                self.spawn(fold.clone());
                return;
            }
            if let Lifecycle::HandingOver { live, target, .. } = &mut *lifecycle {
                if Arc::ptr_eq(live, fold) && target.is_none() {
                    match store.offsets(&live.generation) {
                        Ok(offsets) => *target = Some(offsets),
                        Err(e) => {
                            error!(error = %e, "reading the live generation's final offsets; the handover waits");
                            fold.set_state(RunState::Failed { error: e.to_string() });
                        }
                    }
                    return;
                }
            }
        }
        if let Some(replay) = self.replay().filter(|r| Arc::ptr_eq(&r.fold, fold)) {
            self.replay_loop_ended(&replay, store);
            return;
        }
        // A live loop that stopped on a handover's command after the handover was
        // called off (its replay's loop ended first) folds on.
        let lifecycle = self.state();
        if Arc::ptr_eq(lifecycle.live(), fold)
            && !matches!(lifecycle, Lifecycle::HandingOver { .. })
            && matches!(fold.state(), RunState::Stopped)
        {
            warn!(projection = %self.name, "handover called off: the live generation folds again");
            fold.set_state(RunState::Starting);
            self.spawn(fold.clone());
        }
    }

    /// The fold an operator's resume or skip applies to: the live one when it is
    /// stopped on a poison event or a failure, else a stopped replay (not one
    /// being stopped for good: a live loop handing over, an aborting replay).
    fn stopped_fold(lifecycle: &Lifecycle) -> Option<Arc<Fold>> {
        let stopped =
            |fold: &Fold| matches!(fold.state(), RunState::Poisoned { .. } | RunState::Failed { .. });
        if matches!(lifecycle, Lifecycle::HandingOver { .. }) {
            return None;
        }
        let live = lifecycle.live();
        if stopped(live) {
            return Some(live.clone());
        }
        lifecycle
            .replay()
            .filter(|r| !r.aborting())
            .map(|r| r.fold.clone())
            .filter(|f| stopped(f))
    }

    /// `Poisoned|Failed → Starting` for the fold [`Supervisor::stopped_fold`]
    /// picks, with `skip` for its next loop; that loop starts now, or when the
    /// stopped one has finished exiting ([`Supervisor::loop_exited`]).
    fn restart_stopped(&self, skip: bool) -> Option<(u64, Option<Position>)> {
        let lifecycle = self.lifecycle();
        let fold = Self::stopped_fold(&lifecycle)?;
        let position = match fold.state() {
            RunState::Poisoned {
                topic,
                partition,
                offset,
                ..
            } if skip => Some(Position {
                topic,
                partition,
                offset,
            }),
            _ if skip => return None,
            _ => None,
        };
        if let Some(position) = &position {
            fold.set_skip(position.clone());
        }
        fold.mark_resumed();
        if !fold.loop_running() {
            self.spawn(fold.clone());
        }
        Some((fold.generation.number, position))
    }

    /// Starts a fold loop again after it stopped on a poison event or a failure
    /// (the live one first, else the replay's); the generation resumed, or `None`
    /// when none is stopped.
    pub fn resume(&self) -> Option<u64> {
        self.restart_stopped(false).map(|(generation, _)| generation)
    }

    /// Resumes past exactly the event a fold loop stopped at (the live one first,
    /// else the replay's); that generation and position, or `None` when none is
    /// stopped on a poison event.
    pub fn skip_poison(&self) -> Option<(u64, Position)> {
        let (generation, position) = self.restart_stopped(true)?;
        Some((generation, position?))
    }

    /// `None` when the projection is ready to serve: its live fold runs with its
    /// partitions assigned and positioned; otherwise why not.
    pub fn not_ready(&self) -> Option<String> {
        let lifecycle = self.state();
        let live = lifecycle.live();
        match live.state() {
            RunState::Running if live.is_assigned() => None,
            RunState::Running => Some(format!("{}: waiting for its partition assignment", self.name)),
            // A live generation handing over to a replay is about to be replaced.
            RunState::Stopped if matches!(lifecycle, Lifecycle::HandingOver { .. }) => None,
            other => Some(format!(
                "{}: {}",
                self.name,
                serde_json::to_string(&other).unwrap_or_default()
            )),
        }
    }
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
