//! The replay part of a projection's lifecycle: starting a replay, the handover
//! once it has caught up, the switch, and the end of a replay that did not switch
//! (see the transitions in [`super`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use tracing::{error, info, warn};

use super::{unix_seconds, Lifecycle, StartError, Supervisor};
use crate::fold_state::{Command, Fold, RunState};
use crate::metrics;
use crate::replay::{Replay, ReplayOutcome};
use crate::store::{Generation, SourcePartition, Store, StoreError};

impl Supervisor {
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
        let replay = self.replaying(&mut lifecycle, live, generation);
        drop(lifecycle);
        info!(projection = %self.name, generation = replay.fold.generation.number, "replay started");
        self.spawn(replay.fold.clone());
        Ok(replay)
    }

    /// `→ Replaying` into `generation` (begun in the store), folding with the
    /// configured definition beside `live`; the caller starts its loop.
    pub(super) fn replaying(
        &self,
        lifecycle: &mut Lifecycle,
        live: Arc<Fold>,
        generation: Generation,
    ) -> Arc<Replay> {
        let topics = crate::config::definition_topics(&self.configured_definition);
        let fold = Arc::new(Fold::new(
            generation,
            self.configured_projection.clone(),
            topics,
            false,
        ));
        let replay = Arc::new(Replay::new(fold));
        *lifecycle = Lifecycle::Replaying {
            live,
            replay: replay.clone(),
        };
        replay
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
    /// In multi-worker mode there is none: the cluster topic's replay record
    /// says when every worker switches.
    pub(crate) fn handover_target(&self, replay: &Arc<Replay>) -> Option<BTreeMap<SourcePartition, i64>> {
        if self.is_clustered() {
            return None;
        }
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

    /// A replay's loop is gone without a switch: back to `Replaying` (the live
    /// loop started again if the handover had stopped it), or, when aborting,
    /// to `Live` with the replay's generation dropped.
    pub(super) fn replay_loop_ended(&self, replay: &Arc<Replay>, store: &Store) {
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

    pub(super) fn record_outcome(&self, generation: u64, outcome: &'static str) {
        *self.last_replay.lock().expect("last replay lock") = Some(ReplayOutcome {
            generation,
            outcome,
            ended_at: unix_seconds(),
        });
    }
}
