//! What a worker publishes about itself in the cluster topic: one record per
//! worker, keyed by its id, replaced on every publication and tombstoned on a
//! clean shutdown.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One worker and what it owns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// The worker's id (also the record's key).
    pub worker_id: String,
    /// Its HTTP API, as the other workers reach it.
    pub url: String,
    /// When it published this (milliseconds since the epoch, its clock).
    pub published_at_ms: i64,
    /// Per projection, the partitions its live generation owns.
    pub projections: BTreeMap<String, ProjectionClaims>,
}

/// What one worker folds of one projection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProjectionClaims {
    /// The live generation on that worker.
    pub generation: u64,
    /// Its fold loop's state (`running`, `poisoned`, ...).
    pub status: String,
    /// The partitions assigned to it there.
    pub partitions: Vec<PartitionClaim>,
    /// The deployment's replay as this worker folds it, while one runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay: Option<ReplayClaims>,
}

/// What one worker folds of a deployment's replay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplayClaims {
    /// The generation the replay builds.
    pub generation: u64,
    /// The replay's step as this worker last read it from the cluster topic.
    pub seen: ReplayState,
    /// This worker's live loop (of the generation being replaced) has stopped:
    /// it serves that generation no more and its state cannot move on.
    pub live_stopped: bool,
    /// Events per second this worker's replay loop folds.
    pub events_per_second: f64,
    /// The replay's fold loop state on this worker (`running`, `poisoned`, ...).
    pub status: String,
    /// The partitions of the replay's consumer group assigned to this worker.
    pub partitions: Vec<PartitionClaim>,
}

/// The record key of a projection's replay in the cluster topic.
pub fn replay_key(projection: &str) -> String {
    format!("{REPLAY_KEY_PREFIX}{projection}")
}

pub use crate::config::REPLAY_KEY_PREFIX;

/// One replay of a projection across every worker: the record under
/// [`replay_key`], written by the worker that received the request and moved on
/// by the coordinator (the live worker with the lowest id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplayRecord {
    /// The projection.
    pub projection: String,
    /// The generation every worker builds.
    pub generation: u64,
    /// Where the replay is.
    pub state: ReplayState,
    /// The worker that received the request.
    pub requested_on: String,
    /// When it was requested (milliseconds since the epoch).
    pub started_at_ms: i64,
    /// When `state` was written (milliseconds since the epoch).
    pub updated_at_ms: i64,
    /// From `switching` on: per partition (`topic/partition`), the offset the
    /// new generation must reach before the switch; high watermarks measured
    /// after every worker had stopped folding the old generation.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub targets: BTreeMap<String, i64>,
}

/// The steps of a replay across workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplayState {
    /// Every worker folds its share of the new generation from offset 0.
    Running,
    /// Every partition of the new generation is within the switch distance:
    /// each worker stops folding (and serving) the old generation.
    HandingOver,
    /// Every worker has stopped the old generation; the new one folds up to
    /// the record's targets.
    Switching,
    /// Every partition reached its target: the new generation is live on every
    /// worker.
    Switched,
    /// Called off: every worker drops the new generation; the old one goes on.
    Aborted,
}

impl ReplayState {
    /// True while the replay has not ended.
    pub fn running(self) -> bool {
        !matches!(self, ReplayState::Switched | ReplayState::Aborted)
    }

    /// The name the API shows.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplayState::Running => "replaying",
            ReplayState::HandingOver => "handing_over",
            ReplayState::Switching => "switching",
            ReplayState::Switched => "switched",
            ReplayState::Aborted => "aborted",
        }
    }
}

/// One partition a worker has assigned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartitionClaim {
    /// Source topic.
    pub topic: String,
    /// Source partition.
    pub partition: i32,
    /// Served (`live`) or still folding up to the high watermark seen when the
    /// worker gained it (`restoring`).
    pub state: ClaimState,
    /// The next offset its stored state reflects.
    pub next_offset: i64,
    /// While restoring: the next offset it must reach (when known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_until: Option<i64>,
    /// High watermark − next offset, when the brokers answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_events: Option<i64>,
}

/// Whether a claimed partition is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClaimState {
    /// Folding up to the high watermark seen at the gain: reads get 503.
    Restoring,
    /// Served.
    Live,
}
