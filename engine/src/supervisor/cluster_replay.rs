//! A projection's part in a replay across workers (multi-worker mode): the
//! cluster topic's replay record says which generation every worker builds and
//! when each step happens (`cluster::replays`); these transitions carry the
//! steps out on this worker.
//!
//! ```text
//!  Live ──start_replay_at(G)──▶ Replaying ──cluster_handover(G)──▶ HandingOver
//!                                   │                                  │
//!                                   └────────cluster_switch(G)─────────┴──▶ Live (G)
//! ```
//!
//! Unlike a replay on a worker alone, the handover takes no target from this
//! worker's store: the record's targets cover every partition, whichever worker
//! folds it, and the switch waits for the record's `switched`. An abort is the
//! same as alone ([`Supervisor::abort_replay`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::{Lifecycle, StartError, Supervisor};
use crate::fold_state::{Command, Fold};
use crate::replay::Replay;
use crate::store::{Store, StoreError};

/// How long a replaced generation's loop may take to exit before its column
/// family is dropped anyway at the next start.
const RETIRE_WAIT: Duration = Duration::from_secs(60);

impl Supervisor {
    /// `Live → Replaying` into generation `number`, the one the cluster's replay
    /// record names; nothing when the live generation is that new already.
    pub fn start_replay_at(&self, store: &Store, number: u64) -> Result<Option<Arc<Replay>>, StartError> {
        let mut lifecycle = self.lifecycle();
        let live = match &*lifecycle {
            Lifecycle::Live { live } if live.generation.number < number => live.clone(),
            Lifecycle::Live { .. } => return Ok(None),
            _ => {
                drop(lifecycle);
                return Err(StartError::Running(self.replay_status().unwrap_or_default()));
            }
        };
        let generation = store.begin_replay_at(&self.name, &self.configured_definition, number)?;
        let replay = self.replaying(&mut lifecycle, live, generation);
        drop(lifecycle);
        info!(projection = %self.name, generation = number, "replay across workers: this worker folds its share");
        self.spawn(replay.fold.clone());
        Ok(Some(replay))
    }

    /// `Replaying → HandingOver` for the replay into `number`: the live loop is
    /// told to stop, so this worker neither serves nor folds the old generation
    /// any more. True once the live loop is not running.
    pub fn cluster_handover(&self, number: u64) -> bool {
        let mut lifecycle = self.lifecycle();
        match &*lifecycle {
            Lifecycle::Replaying { live, replay }
                if replay.fold.generation.number == number && !replay.aborting() =>
            {
                info!(projection = %self.name, from = live.generation.number, to = number,
                    "replay across workers caught up: stopping the old generation");
                let (live, replay) = (live.clone(), replay.clone());
                live.tell(Command::Stop);
                *lifecycle = Lifecycle::HandingOver {
                    live: live.clone(),
                    replay,
                    target: None,
                };
                !live.loop_running()
            }
            Lifecycle::HandingOver { live, replay, .. } if replay.fold.generation.number == number => {
                !live.loop_running()
            }
            _ => false,
        }
    }

    /// `Replaying|HandingOver → Live`: the cluster's record says every
    /// partition of generation `number` reached its target. One store write
    /// makes it live here; the old generation's loop is stopped and its column
    /// family dropped once the loop has exited.
    pub fn cluster_switch(&self, store: &Arc<Store>, number: u64) -> Result<bool, StoreError> {
        let mut lifecycle = self.lifecycle();
        let (previous, replay) = match &*lifecycle {
            Lifecycle::Replaying { live, replay } | Lifecycle::HandingOver { live, replay, .. }
                if replay.fold.generation.number == number && !replay.aborting() =>
            {
                (live.clone(), replay.clone())
            }
            _ => return Ok(false),
        };
        store.switch_live(&replay.fold.generation)?;
        replay.fold.set_live();
        *lifecycle = Lifecycle::Live {
            live: replay.fold.clone(),
        };
        drop(lifecycle);
        self.record_outcome(number, "switched");
        info!(projection = %self.name, from = previous.generation.number, to = number,
            "replay across workers switched: generation {number} is live");
        previous.tell(Command::Stop);
        let store = store.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("drop-{}", previous.generation.column_family()))
            .spawn(move || retire(&previous, &store));
        if let Err(e) = spawned {
            warn!(error = %e, "spawning the drop of the old generation (dropped at the next start instead)");
        }
        Ok(true)
    }
}

/// Drops a replaced generation once its loop has exited.
fn retire(previous: &Fold, store: &Store) {
    let deadline = Instant::now() + RETIRE_WAIT;
    while previous.loop_running() {
        if Instant::now() >= deadline {
            warn!(generation = %previous.generation.column_family(),
                "the replaced generation's loop did not exit; it is dropped at the next start");
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    match store.drop_generation(&previous.generation) {
        Ok(()) => info!(generation = %previous.generation.column_family(), "old generation dropped"),
        Err(e) => warn!(error = %e, "dropping the old generation (dropped at the next start instead)"),
    }
}
