//! Full replays without downtime (DESIGN.md invariant 3).
//!
//! A replay folds generation N+1 of a projection from offset 0 in its own fold
//! loop and consumer group, beside the live generation N, which keeps serving
//! reads and folding new events. The lag monitor measures the replay's progress
//! against the high watermarks; once its lag is within `replay.switch_lag_events`,
//! the handover starts:
//!
//! 1. the live loop is asked to stop; it commits its batch and exits, so N's
//!    stored offsets are final;
//! 2. the replay loop folds until its offsets reach N's in every partition, so
//!    N+1 is at least as new as anything a reader saw from N;
//! 3. one RocksDB write moves the live pointer to N+1 and clears the replay mark;
//!    reads go to N+1 from then on, the replay loop goes on as the live loop, and N
//!    is dropped in the background.
//!
//! If the replay stops before step 3 (poison event, failure, abort), the live loop
//! is started again and N goes on as if nothing happened. A worker killed at any
//! point resumes from what the store says: the replay mark and every generation's
//! own offsets.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tracing::{error, info, warn};

use crate::metrics;
use crate::runtime::{Fold, ProjectionRuntime};
use crate::store::{SourcePartition, Store, StoreError};

/// Which step a replay is at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Folding from offset 0 toward the high watermarks.
    Replaying,
    /// Caught up: the live loop is stopping and the replay is folding up to its
    /// final offsets before the switch.
    HandingOver,
}

/// How far a replay is, as of the lag monitor's last refresh.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Progress {
    /// Events folded so far (offsets from the start of each partition).
    pub applied: i64,
    /// Events between the start of each partition and its high watermark.
    pub target: i64,
    /// `applied / target` (1 when there is nothing to fold).
    pub ratio: f64,
    /// Recent fold rate.
    pub events_per_second: f64,
    /// Time left at the recent rate, when it is known.
    pub eta_seconds: Option<f64>,
    /// Events between the replay's offsets and the high watermarks.
    pub lag_events: i64,
}

/// How a replay ended.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayOutcome {
    /// The generation it built.
    pub generation: u64,
    /// `switched` (it is live now) or `aborted`.
    pub outcome: &'static str,
    /// When it ended, in seconds since the epoch.
    pub ended_at: u64,
}

/// A replay in progress.
pub struct Replay {
    /// The fold building the new generation.
    pub fold: Arc<Fold>,
    started_at: u64,
    phase: Mutex<Phase>,
    progress: Mutex<Progress>,
    /// Last (instant, applied) the rate was computed from.
    rate_sample: Mutex<Option<(Instant, i64)>>,
    caught_up: AtomicBool,
    aborting: AtomicBool,
}

impl Replay {
    fn new(fold: Arc<Fold>) -> Replay {
        Replay {
            fold,
            started_at: unix_seconds(),
            phase: Mutex::new(Phase::Replaying),
            progress: Mutex::new(Progress::default()),
            rate_sample: Mutex::new(None),
            caught_up: AtomicBool::new(false),
            aborting: AtomicBool::new(false),
        }
    }

    /// The replay of a generation found marked in the store at start-up.
    pub fn resumed(fold: Arc<Fold>) -> Arc<Replay> {
        Arc::new(Replay::new(fold))
    }

    /// Which step it is at.
    pub fn phase(&self) -> Phase {
        *self.phase.lock().expect("phase lock")
    }

    fn set_phase(&self, phase: Phase) {
        *self.phase.lock().expect("phase lock") = phase;
    }

    /// True once its lag was within the switch threshold.
    pub fn caught_up(&self) -> bool {
        self.caught_up.load(Ordering::SeqCst)
    }

    /// True once an abort was requested.
    pub fn aborting(&self) -> bool {
        self.aborting.load(Ordering::SeqCst)
    }

    /// Its status, as the API shows it.
    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "generation": self.fold.generation.number,
            "phase": self.phase(),
            "fold": self.fold.state(),
            "events_committed": self.fold.committed_events(),
            "started_at": self.started_at,
            "progress": *self.progress.lock().expect("progress lock"),
        })
    }

    /// Records progress measured against the high watermarks: per partition, the
    /// replay's next offset and the partition's (low, high) watermarks. Returns
    /// the progress.
    pub fn record_progress(
        &self,
        positions: &BTreeMap<SourcePartition, (i64, i64, i64)>,
        switch_lag_events: i64,
    ) -> Progress {
        let (mut applied, mut target, mut lag) = (0, 0, 0);
        for &(next, low, high) in positions.values() {
            let next = next.max(low);
            applied += (next - low).max(0);
            target += (high - low).max(0);
            lag += (high - next).max(0);
        }
        let now = Instant::now();
        let mut sample = self.rate_sample.lock().expect("rate lock");
        let mut progress = self.progress.lock().expect("progress lock");
        if let Some((then, applied_then)) = *sample {
            let seconds = now.duration_since(then).as_secs_f64();
            if seconds > 0.0 {
                let rate = (applied - applied_then).max(0) as f64 / seconds;
                // Smoothed, so one slow refresh does not swing the ETA.
                progress.events_per_second = if progress.events_per_second == 0.0 {
                    rate
                } else {
                    0.5 * progress.events_per_second + 0.5 * rate
                };
            }
        }
        *sample = Some((now, applied));
        progress.applied = applied;
        progress.target = target;
        progress.lag_events = lag;
        progress.ratio = if target == 0 {
            1.0
        } else {
            applied as f64 / target as f64
        };
        progress.eta_seconds = if lag == 0 {
            Some(0.0)
        } else if progress.events_per_second > 0.0 {
            Some(lag as f64 / progress.events_per_second)
        } else {
            None
        };
        let labels = self.labels();
        let labels = [labels.0.as_str(), labels.1.as_str()];
        metrics::REPLAY_PROGRESS_RATIO
            .with_label_values(&labels)
            .set(progress.ratio);
        metrics::REPLAY_EVENTS_PER_SECOND
            .with_label_values(&labels)
            .set(progress.events_per_second);
        metrics::REPLAY_ETA_SECONDS
            .with_label_values(&labels)
            .set(progress.eta_seconds.unwrap_or(-1.0));
        if lag <= switch_lag_events {
            self.caught_up.store(true, Ordering::SeqCst);
        }
        progress.clone()
    }

    fn labels(&self) -> (String, String) {
        (
            self.fold.name().to_owned(),
            self.fold.generation.number.to_string(),
        )
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

/// Starts a replay of `runtime` into a new generation with the configured
/// definition; refused while one runs.
pub fn start(runtime: &ProjectionRuntime, store: &Store) -> Result<Arc<Replay>, StartError> {
    let mut slot = runtime.replay_slot();
    if let Some(running) = slot.as_ref() {
        return Err(StartError::Running(running.status()));
    }
    let generation = store.begin_replay(&runtime.name, &runtime.configured_definition)?;
    let topics = crate::config::definition_topics(&runtime.configured_definition);
    let fold = Arc::new(Fold::new(
        generation,
        runtime.configured_projection.clone(),
        topics,
        false,
    ));
    let replay = Arc::new(Replay::new(fold.clone()));
    *slot = Some(replay.clone());
    drop(slot);
    info!(projection = %runtime.name, generation = fold.generation.number, "replay started");
    runtime.spawn(fold);
    Ok(replay)
}

/// Asks the running replay of `runtime` to stop and drop its generation; the
/// generation being aborted, or `None` when no replay runs.
pub fn abort(runtime: &ProjectionRuntime, store: &Store) -> Result<Option<u64>, StoreError> {
    let Some(replay) = runtime.replay() else {
        return Ok(None);
    };
    replay.aborting.store(true, Ordering::SeqCst);
    replay.fold.request_stop();
    let generation = replay.fold.generation.number;
    info!(projection = %runtime.name, generation, "replay abort requested");
    if !replay.fold.loop_running() {
        // Stopped on a poison event or a failure: nothing will exit, clean up here.
        after_loop(runtime, store, &replay, false);
    }
    Ok(Some(generation))
}

/// Step 1 of the handover, called by the replay loop: once caught up, asks the
/// live loop to stop. True while the handover is under way.
pub(crate) fn begin_handover(runtime: &ProjectionRuntime, replay: &Replay) -> bool {
    match replay.phase() {
        Phase::HandingOver => true,
        Phase::Replaying if replay.caught_up() && !replay.aborting() => {
            let live = runtime.live();
            info!(projection = %runtime.name, from = live.generation.number, to = replay.fold.generation.number,
                "replay caught up: handing over");
            live.request_stop();
            replay.set_phase(Phase::HandingOver);
            true
        }
        Phase::Replaying => false,
    }
}

/// Step 2 of the handover: the offsets the replay must reach, once the live loop
/// has stopped (its stored offsets are final); `None` while it is still stopping.
pub(crate) fn live_final_offsets(
    runtime: &ProjectionRuntime,
    store: &Store,
) -> Result<Option<BTreeMap<SourcePartition, i64>>, StoreError> {
    let live = runtime.live();
    if live.loop_running() {
        return Ok(None);
    }
    store.offsets(&live.generation).map(Some)
}

/// Step 3: the replay's batch is committed at or past the live offsets; switch.
pub(crate) fn switch(
    runtime: &ProjectionRuntime,
    store: &Arc<Store>,
    replay: &Replay,
) -> Result<(), StoreError> {
    store.switch_live(&replay.fold.generation)?;
    let generation = replay.fold.generation.number;
    let previous = runtime.promote(
        replay,
        ReplayOutcome {
            generation,
            outcome: "switched",
            ended_at: unix_seconds(),
        },
    );
    let labels = replay.labels();
    let labels = [labels.0.as_str(), labels.1.as_str()];
    metrics::REPLAY_PROGRESS_RATIO.with_label_values(&labels).set(1.0);
    metrics::REPLAY_EVENTS_PER_SECOND
        .with_label_values(&labels)
        .set(0.0);
    metrics::REPLAY_ETA_SECONDS.with_label_values(&labels).set(0.0);
    info!(projection = %runtime.name, from = previous.generation.number, to = generation,
        "replay switched: generation {generation} is live");
    let store = store.clone();
    std::thread::Builder::new()
        .name(format!("drop-{}", previous.generation.column_family()))
        .spawn(move || match store.drop_generation(&previous.generation) {
            Ok(()) => info!(generation = %previous.generation.column_family(), "old generation dropped"),
            Err(e) => warn!(error = %e, "dropping the old generation (dropped at the next start instead)"),
        })
        .map(|_| ())
        .unwrap_or_else(|e| warn!(error = %e, "spawning the drop of the old generation"));
    Ok(())
}

/// Called when a replay's loop exits without having switched: an aborted replay
/// is dropped; a live loop stopped for the handover is started again. On
/// shutdown nothing changes: the next start resumes the replay.
pub(crate) fn after_loop(runtime: &ProjectionRuntime, store: &Store, replay: &Replay, shutting_down: bool) {
    if shutting_down {
        return;
    }
    let live = runtime.live();
    if live.stop_requested() && !live.loop_running() {
        warn!(projection = %runtime.name, "handover interrupted: the live generation folds again");
        live.cancel_stop();
        live.set_state(crate::runtime::RunState::Starting);
        runtime.spawn(live);
    }
    replay.set_phase(Phase::Replaying);
    replay.caught_up.store(false, Ordering::SeqCst);
    if !replay.aborting() {
        return;
    }
    let generation = replay.fold.generation.clone();
    let dropped = store
        .end_replay(&runtime.name)
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
    runtime.forget_replay(ReplayOutcome {
        generation: generation.number,
        outcome: "aborted",
        ended_at: unix_seconds(),
    });
    info!(projection = %runtime.name, generation = generation.number, "replay aborted; its generation dropped");
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
