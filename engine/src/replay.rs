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
//! [`crate::supervisor`] carries the steps out; this module holds a replay's
//! progress.
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

use crate::fold_state::Fold;
use crate::metrics;
use crate::store::SourcePartition;

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
    progress: Mutex<Progress>,
    /// Last (instant, applied) the rate was computed from.
    rate_sample: Mutex<Option<(Instant, i64)>>,
    aborting: AtomicBool,
}

impl Replay {
    pub(crate) fn new(fold: Arc<Fold>) -> Replay {
        Replay {
            fold,
            started_at: unix_seconds(),
            progress: Mutex::new(Progress::default()),
            rate_sample: Mutex::new(None),
            aborting: AtomicBool::new(false),
        }
    }

    /// Asks the replay to stop and drop its generation.
    pub(crate) fn request_abort(&self) {
        self.aborting.store(true, Ordering::SeqCst);
    }

    /// True once an abort was requested.
    pub fn aborting(&self) -> bool {
        self.aborting.load(Ordering::SeqCst)
    }

    /// Its status at `phase`, as the API shows it.
    pub fn status(&self, phase: Phase) -> serde_json::Value {
        serde_json::json!({
            "generation": self.fold.generation.number,
            "phase": phase,
            "fold": self.fold.state(),
            "events_committed": self.fold.committed_events(),
            "started_at": self.started_at,
            "progress": *self.progress.lock().expect("progress lock"),
        })
    }

    /// Progress as of the lag monitor's last refresh.
    pub fn progress(&self) -> Progress {
        self.progress.lock().expect("progress lock").clone()
    }

    /// Records progress measured against the high watermarks: per partition, the
    /// replay's next offset and the partition's (low, high) watermarks. Returns
    /// the progress.
    pub fn record_progress(&self, positions: &BTreeMap<SourcePartition, (i64, i64, i64)>) -> Progress {
        let (mut applied, mut target, mut lag) = (0i64, 0i64, 0i64);
        for &(next, low, high) in positions.values() {
            let next = next.max(low);
            applied = applied.saturating_add(next.saturating_sub(low).max(0));
            target = target.saturating_add(high.saturating_sub(low).max(0));
            lag = lag.saturating_add(high.saturating_sub(next).max(0));
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
        progress.clone()
    }

    pub(crate) fn labels(&self) -> (String, String) {
        (
            self.fold.name().to_owned(),
            self.fold.generation.number.to_string(),
        )
    }
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
