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
//! its own channel ([`Command`]) and reports how it ended with
//! [`Supervisor::loop_exited`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value as Json;
use tracing::{error, info, warn};

use crate::config::{PoisonPolicy, ProjectionConfig};
use crate::fold_state::{Command, Fold, Position, RunState};
use crate::metrics;
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
    /// The definition in the config, which a replay folds with.
    pub configured_definition: Json,
    /// The fold built from the configured definition.
    pub configured_projection: Arc<dyn Projection>,
    lifecycle: Mutex<Lifecycle>,
    last_replay: Mutex<Option<ReplayOutcome>>,
    spawner: OnceLock<Spawner>,
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
            configured_definition: config.definition(),
            configured_projection,
            lifecycle: Mutex::new(lifecycle),
            last_replay: Mutex::new(None),
            spawner: OnceLock::new(),
        }
    }

    fn lifecycle(&self) -> MutexGuard<'_, Lifecycle> {
        self.lifecycle.lock().expect("lifecycle lock")
    }

    /// Sets how to start a fold loop (once, by the worker).
    pub fn set_spawner(&self, spawner: Spawner) {
        let _ = self.spawner.set(spawner);
    }

    /// Starts the loops of the live generation and of a replay found in the store.
    pub fn start(&self) {
        let lifecycle = self.lifecycle().clone();
        self.spawn(lifecycle.live().clone());
        if let Some(replay) = lifecycle.replay() {
            info!(projection = %self.name, generation = replay.fold.generation.number, "resuming the replay");
            self.spawn(replay.fold.clone());
        }
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

    /// True when `fold` is the running replay's.
    pub fn is_replay(&self, fold: &Arc<Fold>) -> bool {
        self.replay().is_some_and(|r| Arc::ptr_eq(&r.fold, fold))
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

    /// `Live → Replaying`: starts a replay into a new generation with the
    /// configured definition; refused while one runs.
    pub fn start_replay(&self, store: &Store) -> Result<Arc<Replay>, StartError> {
        let mut lifecycle = self.lifecycle();
        let live = match &*lifecycle {
            Lifecycle::Live { live } => live.clone(),
            _ => {
                drop(lifecycle);
                let status = self.replay_status().unwrap_or_default();
                return Err(StartError::Running(status));
            }
        };
        let generation = store.begin_replay(&self.name, &self.configured_definition)?;
        let topics = crate::config::definition_topics(&self.configured_definition);
        let fold = Arc::new(Fold::new(
            generation,
            self.configured_projection.clone(),
            topics,
            false,
        ));
        let replay = Arc::new(Replay::new(fold.clone()));
        *lifecycle = Lifecycle::Replaying {
            live,
            replay: replay.clone(),
        };
        drop(lifecycle);
        info!(projection = %self.name, generation = fold.generation.number, "replay started");
        self.spawn(fold);
        Ok(replay)
    }

    /// `Replaying → HandingOver`: the lag monitor found the replay within the
    /// switch distance. The live loop is told to stop; when it is not running
    /// (stopped on a poison event) its offsets are final already.
    pub fn replay_caught_up(&self, replay: &Arc<Replay>, store: &Store) -> Result<(), StoreError> {
        let mut lifecycle = self.lifecycle();
        let Lifecycle::Replaying {
            live,
            replay: current,
        } = &*lifecycle
        else {
            return Ok(());
        };
        if !Arc::ptr_eq(current, replay) || replay.aborting() || !replay.fold.loop_running() {
            return Ok(());
        }
        info!(projection = %self.name, from = live.generation.number, to = replay.fold.generation.number,
            "replay caught up: handing over");
        let live = live.clone();
        let target = if live.tell(Command::Stop) {
            None
        } else {
            Some(store.offsets(&live.generation)?)
        };
        *lifecycle = Lifecycle::HandingOver {
            live,
            replay: replay.clone(),
            target,
        };
        Ok(())
    }

    /// The offsets the replay's loop must reach before it switches; `None` until
    /// the handover's live loop has exited.
    pub(crate) fn handover_target(&self, replay: &Arc<Replay>) -> Option<BTreeMap<SourcePartition, i64>> {
        match &*self.lifecycle() {
            Lifecycle::HandingOver {
                replay: current,
                target,
                ..
            } if Arc::ptr_eq(current, replay) => target.clone(),
            _ => None,
        }
    }

    /// `HandingOver → Live`: the replay's loop committed at or past the target;
    /// one store write makes its generation live, and the old one is dropped in
    /// the background.
    pub(crate) fn switch(&self, replay: &Arc<Replay>, store: &Arc<Store>) -> Result<(), StoreError> {
        let mut lifecycle = self.lifecycle();
        let Lifecycle::HandingOver {
            live: previous,
            replay: current,
            target: Some(_),
        } = &*lifecycle
        else {
            return Ok(());
        };
        if !Arc::ptr_eq(current, replay) {
            return Ok(());
        }
        let previous = previous.clone();
        store.switch_live(&replay.fold.generation)?;
        replay.fold.set_live();
        *lifecycle = Lifecycle::Live {
            live: replay.fold.clone(),
        };
        drop(lifecycle);
        let generation = replay.fold.generation.number;
        self.record_outcome(generation, "switched");
        let labels = replay.labels();
        let labels = [labels.0.as_str(), labels.1.as_str()];
        metrics::REPLAY_PROGRESS_RATIO.with_label_values(&labels).set(1.0);
        metrics::REPLAY_EVENTS_PER_SECOND
            .with_label_values(&labels)
            .set(0.0);
        metrics::REPLAY_ETA_SECONDS.with_label_values(&labels).set(0.0);
        info!(projection = %self.name, from = previous.generation.number, to = generation,
            "replay switched: generation {generation} is live");
        let store = store.clone();
        std::thread::Builder::new()
            .name(format!("drop-{}", previous.generation.column_family()))
            .spawn(move || match store.drop_generation(&previous.generation) {
                Ok(()) => info!(generation = %previous.generation.column_family(), "old generation dropped"),
                Err(e) => {
                    warn!(error = %e, "dropping the old generation (dropped at the next start instead)")
                }
            })
            .map(|_| ())
            .unwrap_or_else(|e| warn!(error = %e, "spawning the drop of the old generation"));
        Ok(())
    }

    /// Asks the running replay to stop and drop its generation; the generation
    /// being aborted, or `None` when no replay runs. `Replaying|HandingOver →
    /// Live` once its loop has exited (at once when it is not running).
    pub fn abort_replay(&self, store: &Store) -> Option<u64> {
        let replay = self.replay()?;
        replay.request_abort();
        let generation = replay.fold.generation.number;
        info!(projection = %self.name, generation, "replay abort requested");
        if !replay.fold.tell(Command::Stop) {
            // Stopped on a poison event or a failure: nothing will exit, end it here.
            self.replay_loop_ended(&replay, store);
        }
        Some(generation)
    }

    /// A fold loop's thread ends. The live loop of a handover makes the target
    /// final; a replay's loop that did not switch hands the projection back to
    /// its live generation (and an aborted replay is dropped). At shutdown
    /// nothing changes: the next start resumes from what the store says.
    pub(crate) fn loop_exited(&self, fold: &Arc<Fold>, store: &Store, shutting_down: bool) {
        fold.stop_listening();
        {
            let mut lifecycle = self.lifecycle();
            fold.set_loop_running(false);
            if shutting_down {
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

    /// A replay's loop is gone without a switch: back to `Replaying` (the live
    /// loop started again if the handover had stopped it), or, when aborting,
    /// to `Live` with the replay's generation dropped.
    fn replay_loop_ended(&self, replay: &Arc<Replay>, store: &Store) {
        let mut lifecycle = self.lifecycle();
        let (live, was_handing_over) = match &*lifecycle {
            Lifecycle::Replaying { live, replay: r } if Arc::ptr_eq(r, replay) => (live.clone(), false),
            Lifecycle::HandingOver { live, replay: r, .. } if Arc::ptr_eq(r, replay) => (live.clone(), true),
            _ => return,
        };
        let restart_live = was_handing_over && !live.loop_running();
        *lifecycle = if replay.aborting() {
            Lifecycle::Live { live: live.clone() }
        } else {
            Lifecycle::Replaying {
                live: live.clone(),
                replay: replay.clone(),
            }
        };
        drop(lifecycle);
        if restart_live {
            warn!(projection = %self.name, "handover interrupted: the live generation folds again");
            live.set_state(RunState::Starting);
            self.spawn(live);
        }
        if replay.aborting() {
            self.drop_aborted(replay, store);
        }
    }

    fn drop_aborted(&self, replay: &Replay, store: &Store) {
        let generation = replay.fold.generation.clone();
        let dropped = store
            .end_replay(&self.name)
            .and_then(|()| store.drop_generation(&generation));
        if let Err(e) = dropped {
            error!(error = %e, "dropping the aborted replay's generation (dropped at the next start instead)");
        }
        let labels = replay.labels();
        for metric in [
            &*metrics::REPLAY_PROGRESS_RATIO,
            &*metrics::REPLAY_EVENTS_PER_SECOND,
            &*metrics::REPLAY_ETA_SECONDS,
        ] {
            let _ = metric.remove_label_values(&[&labels.0, &labels.1]);
        }
        self.record_outcome(generation.number, "aborted");
        info!(projection = %self.name, generation = generation.number, "replay aborted; its generation dropped");
    }

    fn record_outcome(&self, generation: u64, outcome: &'static str) {
        *self.last_replay.lock().expect("last replay lock") = Some(ReplayOutcome {
            generation,
            outcome,
            ended_at: unix_seconds(),
        });
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
